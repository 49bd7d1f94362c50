"""Analytic cost model: prefill FLOPs and KV-cache bytes (paper Sec. 5.4, Table 4).

Two formulas:

- :func:`paper_prefill_flops` is the paper's, for the LLM only and visual tokens only:
  ``FLOPs = L * (8*n*d^2 + 4*n^2*d + 6*n*d*m)`` (LLaVA-NeXT-7B: L = 32, d = 4096, m = 11008; 2880 -> 41.65 T).
- :func:`prefill_flops` derives the same count from any Hugging Face config and adds what the paper leaves out:
  the vision tower over every tile, the projector, the text tokens, grouped-query attention and the LM head.

Convention (both): FLOPs = 2 x multiply-accumulates of the matrix products (linear layers, the patch-embedding
convolution, attention ``Q K^T`` and ``A V``). Norms, activations, softmax, rotary embeddings and residual adds are
not counted (well under 1 % here). Attention counts the full ``n x n`` score matrix as the paper does; pass
``causal=True`` to halve that term (what a causal kernel that skips the masked half does).
Restricted to the paper's terms (LLM layers, visual tokens, no LM head, full attention) :func:`prefill_flops`
equals :func:`paper_prefill_flops` exactly; a test holds them equal and checks :func:`prefill_flops` against
``torch.utils.flop_counter`` on a real forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Vision towers that prepend a [CLS] token (SigLIP has none); DINOv2 may add register tokens on top.
_CLS_TOWERS = ("clip_vision_model", "clip", "dinov2", "dinov2_with_registers")
# Text models whose MLP has no gate (two matrices instead of three).
_UNGATED_LLMS = ("gpt2", "gpt_neox", "opt", "phi", "bloom", "falcon", "gpt_bigcode")


def paper_prefill_flops(
    num_tokens: int, num_layers: int = 32, hidden: int = 4096, intermediate: int = 11008
) -> float:
    """The paper's prefill FLOPs of the LLM over ``num_tokens`` visual tokens (LLaVA-NeXT-7B by default)."""
    n, d, m = float(num_tokens), float(hidden), float(intermediate)
    return num_layers * (8 * n * d * d + 4 * n * n * d + 6 * n * d * m)


def kv_cache_bytes(num_tokens: int, num_layers: int, kv_dim: int, bytes_per_element: int = 2) -> int:
    """Bytes of the key + value cache after a prefill of ``num_tokens`` (per sequence).

    ``kv_dim`` = num_key_value_heads x head_dim (= hidden size without grouped-query attention). For
    LLaVA-NeXT-7B in fp16 this is 2 * 32 * 4096 * 2 B = 0.5 MiB per token.
    """
    return 2 * num_layers * num_tokens * kv_dim * bytes_per_element


@dataclass(frozen=True)
class VisionDims:
    """The geometry of a ViT tower that the FLOPs count needs."""

    hidden: int
    intermediate: int
    num_layers: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int  # [CLS] (+ registers)
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        return self.num_patches + self.num_prefix_tokens


@dataclass(frozen=True)
class TextDims:
    """The geometry of a decoder-only LLM that the FLOPs count needs."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool = True

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelDims:
    """What :func:`prefill_flops` reads from a config: vision tower (optional), projector, LLM."""

    text: TextDims
    vision: VisionDims | None = None
    projector_in: int = 0  # 0 = no projector
    projector_layers: int = 2


def _text_dims(cfg: Any) -> TextDims:
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    gated = getattr(cfg, "model_type", "llama") not in _UNGATED_LLMS
    return TextDims(
        hidden=hidden, intermediate=int(intermediate), num_layers=int(cfg.num_hidden_layers), num_heads=heads,
        num_kv_heads=int(kv_heads), head_dim=int(head_dim), vocab_size=int(cfg.vocab_size), gated_mlp=gated,
    )  # fmt: skip


def _vision_dims(cfg: Any) -> VisionDims:
    model_type = getattr(cfg, "model_type", "")
    prefix = 1 if model_type in _CLS_TOWERS else 0
    prefix += int(getattr(cfg, "num_register_tokens", 0) or 0)
    return VisionDims(
        hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size), num_layers=int(cfg.num_hidden_layers),
        image_size=int(cfg.image_size), patch_size=int(cfg.patch_size), num_prefix_tokens=prefix,
        num_channels=int(getattr(cfg, "num_channels", 3)),
    )  # fmt: skip


def dims_from_config(config: Any) -> ModelDims:
    """Read the dimensions of a multimodal (``vision_config`` + ``text_config``) or text-only HF config.

    The LLaVA projector is two linear layers (vision width x #feature layers -> d -> d).
    """
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None)
    text = _text_dims(text_cfg)
    if vision_cfg is None:
        return ModelDims(text=text)
    vision = _vision_dims(vision_cfg)
    layers = getattr(config, "vision_feature_layer", -2)
    num_feature_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
    return ModelDims(text=text, vision=vision, projector_in=vision.hidden * num_feature_layers)


@dataclass(frozen=True)
class FlopsBreakdown:
    """Prefill FLOPs by part (FLOPs = 2 x MACs). ``total`` is their sum."""

    vision: float
    projector: float
    llm: float
    lm_head: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm + self.lm_head

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def vision_flops(dims: VisionDims, num_tiles: int) -> float:
    """ViT encoder over ``num_tiles`` tiles: patch embedding + every layer (HF runs them all)."""
    t, d, m = dims.tokens_per_tile, dims.hidden, dims.intermediate
    patch_embed = 2.0 * dims.num_patches * dims.num_channels * dims.patch_size**2 * d
    per_layer = 8.0 * t * d * d + 4.0 * t * t * d + 4.0 * t * d * m  # q,k,v,o + QK^T, AV + fc1, fc2
    return num_tiles * (patch_embed + dims.num_layers * per_layer)


def llm_layer_flops(dims: TextDims, num_tokens: int, *, causal: bool = False) -> float:
    """One decoder layer over ``num_tokens`` tokens (grouped-query attention, gated or plain MLP)."""
    n, d = float(num_tokens), float(dims.hidden)
    proj = 2.0 * n * d * (2 * dims.q_dim + 2 * dims.kv_dim)  # q, o and k, v
    attn = 4.0 * n * n * dims.q_dim * (0.5 if causal else 1.0)  # Q K^T and A V over all query heads
    mlp = (6.0 if dims.gated_mlp else 4.0) * n * d * dims.intermediate
    return proj + attn + mlp


def prefill_flops(
    config: Any,
    *,
    num_visual_tokens: int,
    num_text_tokens: int = 0,
    num_tiles: int = 0,
    logits_tokens: int = 1,
    causal: bool = False,
) -> FlopsBreakdown:
    """Prefill FLOPs of a (multimodal) HF model, derived from its config.

    Args:
        config: an HF config (e.g. ``LlavaNextConfig``) or a :class:`ModelDims`.
        num_visual_tokens: image tokens handed to the LLM (after compression; newlines included).
        num_text_tokens: the prompt's other tokens.
        num_tiles: tiles the vision tower encodes (thumbnail + crops; 5 for a 2x2 LLaVA-NeXT grid). The tower
            and the projector see every tile token whatever the compression: LLaVA-NeXT selects after projecting.
        logits_tokens: positions the LM head is applied to (1 in ``generate``'s prefill).
        causal: halve the attention-score term (default: full ``n^2``, as the paper counts).

    Returns:
        A :class:`FlopsBreakdown` (vision, projector, llm, lm_head).
    """
    dims = config if isinstance(config, ModelDims) else dims_from_config(config)
    text = dims.text
    vision = projector = 0.0
    if dims.vision is not None and num_tiles:
        vision = vision_flops(dims.vision, num_tiles)
        if dims.projector_in:
            tokens = num_tiles * dims.vision.num_patches
            projector = (
                2.0
                * tokens
                * (dims.projector_in * text.hidden + (dims.projector_layers - 1) * text.hidden**2)
            )
    n = num_visual_tokens + num_text_tokens
    llm = text.num_layers * llm_layer_flops(text, n, causal=causal)
    lm_head = 2.0 * logits_tokens * text.hidden * text.vocab_size
    return FlopsBreakdown(vision=vision, projector=projector, llm=llm, lm_head=lm_head)


LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PAPER_FULL_TOKENS = 2880  # the paper's "upper bound, 2880 tokens" (5 tiles x 576)


def llava_next_7b_config() -> Any:
    """The geometry of ``llava-hf/llava-v1.6-vicuna-7b-hf`` built offline (CLIP ViT-L/14-336 + Vicuna-7B).

    Only dimensions matter here; nothing is downloaded and no weights are allocated.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    return LlavaNextConfig(  # type: ignore[call-arg]
        vision_config=vision, text_config=text, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=32000,
    )  # fmt: skip


def paper_table(ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)) -> list[dict[str, float]]:
    """Paper-convention rows for LLaVA-NeXT-7B: n = 2880 * R visual tokens, TFLOPs, fp16 KV cache (MiB)."""
    rows = []
    for ratio in ratios:
        n = int(round(PAPER_FULL_TOKENS * ratio))
        rows.append({
            "ratio": ratio,
            "visual_tokens": n,
            "tflops": paper_prefill_flops(n) / 1e12,
            "kv_cache_mb": kv_cache_bytes(n, 32, 4096, 2) / 2**20,
        })  # fmt: skip
    return rows


def config_table(
    config: Any,
    *,
    image_size: tuple[int, int] = (672, 672),
    num_text_tokens: int = 0,
    ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1),
    bytes_per_element: int = 2,
) -> list[dict[str, float]]:
    """Config-derived rows for one LLaVA-NeXT image of ``image_size`` (H, W) at each R.

    Visual tokens are the budget-mode count of the LLaVA-NeXT geometry (:meth:`AnyresGeometry.num_tokens
    <globalcom2.adapters.anyres.AnyresGeometry.num_tokens>`, what the patched processor emits; at R = 1 the
    uncompressed count).
    """
    from ..adapters.anyres import anyres_geometry

    dims = dims_from_config(config)
    assert dims.vision is not None, "config_table needs a multimodal config"
    tile = dims.vision.image_size
    geo = anyres_geometry(image_size, config.image_grid_pinpoints, tile, tile // dims.vision.patch_size)
    num_tiles = 1 + geo.grid[0] * geo.grid[1]
    restricted = ModelDims(text=dims.text)  # LLM layers only: the paper's terms
    out = []
    for ratio in ratios:
        n = geo.num_tokens(ratio)
        parts = prefill_flops(
            config, num_visual_tokens=n, num_text_tokens=num_text_tokens, num_tiles=num_tiles
        )
        paper_terms = prefill_flops(restricted, num_visual_tokens=n, logits_tokens=0).total
        out.append({
            "ratio": ratio,
            "visual_tokens": n,
            "text_tokens": num_text_tokens,
            "num_tiles": num_tiles,
            **{f"tflops_{k}": v / 1e12 for k, v in parts.as_dict().items()},
            "tflops_paper_terms": paper_terms / 1e12,
            "kv_cache_mb": kv_cache_bytes(n + num_text_tokens, dims.text.num_layers, dims.text.kv_dim,
                                          bytes_per_element) / 2**20,
        })  # fmt: skip
    return out
