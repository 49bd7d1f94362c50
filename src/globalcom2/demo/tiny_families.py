"""Tiny, randomly initialised LLaVA-OneVision and InternVL checkpoints built offline, and their stand-in variants.

Same recipe as :mod:`globalcom2.demo.tiny_model` (real transformers classes, random weights, a fixed BPE tokenizer
built in code, ``save_pretrained`` then ``from_pretrained``; the shared pieces are in :mod:`globalcom2.demo.tiny_parts`),
for the two other families GlobalCom² supports:

* **LLaVA-OneVision** (``LlavaOnevisionForConditionalGeneration``): a random SigLIP tower (no [CLS]; vision feature
  strategy ``"full"``), OneVision's ``anyres_max_9`` pinpoints (every a x b grid up to 6 x 6 tiles) and a tiny Qwen2.
  With ``vision="dinov2"`` the tower is the real DINOv2 ViT-S/14 stand-in at 378 px, whose 27 x 27 grid is the grid
  of OneVision's SigLIP-384/14 (it has a [CLS] token, so the strategy is ``"default"`` and the processor counts 730
  tokens per tile, exactly as HF expects for a [CLS] tower).
* **InternVL** (``InternVLForConditionalGeneration``): a random InternViT (``InternVLVisionModel``, [CLS] first,
  optional q/k RMS norms), dynamic tiles with the thumbnail last, 2 x 2 pixel-shuffle merging, a tiny Qwen2. With
  ``vision="dinov2"`` the InternViT *class* carries the DINOv2 stand-in's weights at 448 px (the two are the same
  pre-norm ViT with LayerScale; the mapping is checked against ``Dinov2Model`` in the tests), i.e. InternVL's real
  448 px / 32 x 32 patch / 16 x 16 merged-token geometry.

Processors without torchvision: in transformers 5.19-5.24 ``LlavaOnevisionProcessor`` and ``InternVLProcessor``
insist on a video processor, which needs torchvision. The builders make the processor with
:func:`globalcom2.processors.build_processor_without_video` (the same processor class, less the video processor;
no transformers class is changed) and save it with ``save_pretrained``; :func:`globalcom2.loading.load_processor`
loads it back, with ``AutoProcessor`` where torchvision is installed. Image inputs are unaffected; video inputs
need torchvision anyway.

:func:`build_standin_checkpoint` writes the DINOv2 stand-in model of any family (``--model standin``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..processors import build_processor_without_video
from .tiny_parts import (
    CLIP_MEAN,
    CLIP_STD,
    build_family_tokenizer,
    llm_config,
    save_random_checkpoint,
    standin_vision,
    tiny_vit_config,
)


def _registered_families() -> tuple[str, ...]:
    """Every family of the adapter registry, LLaVA-NeXT (the default) first: the ``--family`` choices of ``demo``,
    ``eval``, ``visualize`` and ``bench --table4`` come from here, so a family registered later is offered too
    (:func:`build_standin_checkpoint` must then build its stand-in; a test holds the two equal)."""
    from .. import adapters  # noqa: F401  (importing the package registers every family)
    from ..adapters.registry import ADAPTERS

    return ("llava_next", *(family for family in ADAPTERS if family != "llava_next"))


FAMILIES = _registered_families()
#: stand-ins whose vision tower is random, not the DINOv2 stand-in (it does not fit the family's tower class): their
#: eval numbers measure agreement with the uncompressed tiny model, not what a trained encoder finds important
RANDOM_TOWER_FAMILIES = ("llama4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")


#: the families ``globalcom2 demo`` runs (its per-family notes, :data:`globalcom2.demo.run.FAMILY_NOTES`, and its
#: timing of the tiled families' vision pass); Idefics3 and the Qwen-VL classes are offered by the other commands
DEMO_FAMILIES = tuple(f for f in FAMILIES if f != "idefics3" and not f.startswith("qwen"))


def standin_tower(family: str) -> str:
    """What vision tower ``family``'s stand-in has, in words (for logs, reports and ``--help``)."""
    return "random vision tower" if family in RANDOM_TOWER_FAMILIES else "DINOv2 tower"


_ONEVISION_SPECIALS = {"image_token": "<image>", "video_token": "<video>"}
_INTERNVL_SPECIALS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def _qwen2(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import Qwen2Config

    return llm_config(
        Qwen2Config, tokenizer, hidden, layers, heads, max_positions=16384, tie_word_embeddings=False
    )


def onevision_pinpoints(tile: int, max_side: int = 6) -> list[list[int]]:
    """OneVision's anyres_max_9 candidate canvases: every a x b grid of tiles with 1 <= a, b <= ``max_side``."""
    return [[tile * a, tile * b] for a in range(1, max_side + 1) for b in range(1, max_side + 1)]


def build_tiny_llava_onevision(
    out_dir: str | Path,
    *,
    vision: str = "siglip",
    tile_size: int = 56,
    patch_size: int = 8,
    max_side: int = 6,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
    vision_tower: Any = None,
) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint + processor to ``out_dir`` and return the path.

    Args:
        vision: ``"siglip"`` (random 2-layer SigLIP, tile ``tile_size``, patch ``patch_size``; no [CLS], strategy
            ``"full"``), ``"clip"`` (random 2-layer CLIP with a [CLS]; strategy ``"default"`` drops it) or
            ``"dinov2"`` (the DINOv2 stand-in at ``tile_size`` px, e.g. 378 for 27 x 27; strategy ``"default"``).
        tile_size, patch_size: tile side in pixels and ViT patch size (SigLIP only; DINOv2 uses 14).
        max_side: pinpoints are every a x b grid with a, b <= ``max_side`` (6 in released checkpoints).
        text_hidden, text_layers, text_heads: tiny Qwen2 LLM.
        vision_tower: an already built DINOv2 tower to reuse.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    tokenizer = build_family_tokenizer(_ONEVISION_SPECIALS)
    if vision == "siglip":
        vision_config: Any = tiny_vit_config(
            SiglipVisionConfig, tile_size, patch_size, 2, vision_use_head=False
        )
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # SigLIP's normalisation
        strategy: Any = "full"
        prefix = 0
    elif vision == "clip":
        vision_config = tiny_vit_config(CLIPVisionConfig, tile_size, patch_size, 2, projection_dim=32)
        mean, std = CLIP_MEAN, CLIP_STD
        strategy, prefix = "default", 1
    elif vision == "dinov2":
        vision_tower, vision_config, patch_size, mean, std = standin_vision(tile_size, vision_tower)
        strategy, prefix = "default", 1
    else:
        raise ValueError(f"`vision` must be 'siglip', 'clip' or 'dinov2', got {vision!r}")
    g = tile_size // patch_size
    pinpoints = onevision_pinpoints(tile_size, max_side)
    config = LlavaOnevisionConfig(  # type: ignore[call-arg]
        vision_config=vision_config, text_config=_qwen2(tokenizer, text_hidden, text_layers, text_heads),
        image_grid_pinpoints=pinpoints, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy=strategy, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, image_grid_pinpoints=pinpoints,
        image_mean=mean, image_std=std,
    )  # fmt: skip
    processor = build_processor_without_video(
        LlavaOnevisionProcessor, image_processor=image_processor, tokenizer=tokenizer,
        num_image_tokens=g * g + prefix, vision_feature_select_strategy=strategy, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    return save_random_checkpoint(
        out_dir, LlavaOnevisionForConditionalGeneration, config, processor, seed=seed, vision_tower=vision_tower
    )  # fmt: skip


def standin_internvl_vision_model(image_size: int = 448, dinov2: Any = None):
    """The DINOv2 ViT-S/14 stand-in's weights in a stock ``InternVLVisionModel`` (InternViT class) at ``image_size``.

    DINOv2 and InternViT are the same pre-norm ViT with LayerScale ([CLS] first, learned absolute positions,
    qkv bias, exact GELU, LayerNorm eps 1e-6), so every tensor maps one to one; ``use_mean_pooling=False`` keeps
    DINOv2's final LayerNorm on ``last_hidden_state``. At ``image_size`` the position table needs no resampling.
    """
    import torch
    from transformers import InternVLVisionConfig, InternVLVisionModel

    from .encoder import load_standin_vision_tower

    src = dinov2 if dinov2 is not None else load_standin_vision_tower(image_size)
    dc = src.config
    config = InternVLVisionConfig(
        hidden_size=dc.hidden_size, num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads, intermediate_size=int(dc.hidden_size * dc.mlp_ratio),
        attention_bias=True, use_qk_norm=False, hidden_act="gelu", norm_type="layer_norm",
        layer_norm_eps=dc.layer_norm_eps, image_size=image_size, patch_size=dc.patch_size,
        use_mask_token=False, use_absolute_position_embeddings=True, use_mean_pooling=False,
    )  # fmt: skip
    s = src.state_dict()
    state = {
        "embeddings.cls_token": s["embeddings.cls_token"],
        "embeddings.position_embeddings": s["embeddings.position_embeddings"],
        "embeddings.patch_embeddings.projection.weight": s["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.projection.bias": s["embeddings.patch_embeddings.projection.bias"],
        "layernorm.weight": s["layernorm.weight"],
        "layernorm.bias": s["layernorm.bias"],
    }
    names = {
        "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.q_proj": "attention.q_proj",
        "attention.k_proj": "attention.k_proj", "attention.v_proj": "attention.v_proj",
        "attention.projection_layer": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }  # fmt: skip
    for i in range(dc.num_hidden_layers):
        for new, old in names.items():
            for p in ("weight", "bias"):
                state[f"encoder.layer.{i}.{new}.{p}"] = s[f"encoder.layer.{i}.{old}.{p}"]
        state[f"encoder.layer.{i}.lambda_1"] = s[f"encoder.layer.{i}.layer_scale1.lambda1"]
        state[f"encoder.layer.{i}.lambda_2"] = s[f"encoder.layer.{i}.layer_scale2.lambda1"]
    with torch.device("meta"):
        model = InternVLVisionModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)


def build_tiny_internvl(
    out_dir: str | Path,
    *,
    vision: str = "random",
    tile_size: int = 112,
    patch_size: int = 8,
    max_patches: int = 6,
    qk_norm: bool = True,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
    vision_tower: Any = None,
) -> Path:
    """Write a tiny random InternVL checkpoint + processor to ``out_dir`` and return the path.

    Args:
        vision: ``"random"`` (2-layer InternViT, tile ``tile_size``, patch ``patch_size``, RMS norms and q/k norms
            when ``qk_norm``) or ``"dinov2"`` (the DINOv2 stand-in as InternViT at ``tile_size`` px, e.g. 448).
        max_patches: most crops per image (the processor's ``max_patches``; 12 in released checkpoints).
        text_hidden, text_layers, text_heads: tiny Qwen2 LLM.
        vision_tower: an already built ``InternVLVisionModel`` to reuse (``vision="dinov2"`` only).
    """
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    tokenizer = build_family_tokenizer(_INTERNVL_SPECIALS)
    if vision == "random":
        vision_config: Any = tiny_vit_config(
            InternVLVisionConfig, tile_size, patch_size, 2, attention_bias=True, use_qk_norm=qk_norm,
            norm_type="rms_norm" if qk_norm else "layer_norm", use_mean_pooling=True,
        )  # fmt: skip
        mean, std = CLIP_MEAN, CLIP_STD
    elif vision == "dinov2":
        vision_tower, vision_config, patch_size, mean, std = standin_vision(
            tile_size, vision_tower, standin_internvl_vision_model
        )
    else:
        raise ValueError(f"`vision` must be 'random' or 'dinov2', got {vision!r}")
    seq_len = (tile_size // patch_size // 2) ** 2
    config = InternVLConfig(  # type: ignore[call-arg]
        vision_config=vision_config, text_config=_qwen2(tokenizer, text_hidden, text_layers, text_heads),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq_len,
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1,
        max_patches=max_patches, image_mean=mean, image_std=std,
    )  # fmt: skip
    processor = build_processor_without_video(
        InternVLProcessor, image_processor=image_processor, tokenizer=tokenizer, image_seq_length=seq_len
    )
    return save_random_checkpoint(
        out_dir, InternVLForConditionalGeneration, config, processor, seed=seed, vision_tower=vision_tower
    )


def build_standin_checkpoint(
    workdir: str | Path, *, family: str = "llava_next", llm_hidden: int = 512, llm_layers: int = 4
) -> Path:
    """Write the DINOv2 stand-in model of ``family`` (stock transformers classes, tiny random LLM) under
    ``workdir`` and return its folder; :func:`globalcom2.loading.load_standin` loads it.

    ``llava_next``: LlavaNextForConditionalGeneration, 336 px tiles. ``llava_onevision``:
    LlavaOnevisionForConditionalGeneration, 378 px tiles (27x27). ``internvl``: InternVLForConditionalGeneration
    with the stand-in as InternViT, 448 px tiles, up to 6 crops. ``smolvlm``: SmolVLMForConditionalGeneration with
    the stand-in in its SigLIP-style tower, 378 px crops (27x27 patches as SmolVLM's 384 px crops, 3x3 shuffle: 81 tokens), up to 4x4 crops.
    ``gemma3``: Gemma3ForConditionalGeneration, the stand-in as SigLIP at 896 px (64x64 patches pooled 4x4 to 256
    tokens). ``aya_vision``: AyaVisionForConditionalGeneration, the stand-in as SigLIP at 364 px (26x26 patches,
    2x2 shuffle: 169 tokens per tile), up to 6 crops. ``cohere2_vision``: Cohere2VisionForConditionalGeneration, the stand-in as SigLIP at 448 px (32x32
    patches as Command-A-Vision's 512 px / 16 px, 2x2 shuffle: 256 tokens per tile), up to 6 crops. ``llama4``: Llama4ForConditionalGeneration at Llama-4-Scout's
    geometry (336 px tiles of 14 px patches, 144 tokens per tile, up to 16 tiles + the global tile) with a *random*
    2-layer vision encoder: the stand-in's weights do not fit Llama 4's encoder (class embedding last, 2-D RoPE).
    ``idefics3``: Idefics3ForConditionalGeneration with the stand-in as SmolVLM's (378 px crops, up to 4 x 4).
    ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_5``: the family's own classes with a *random* 2-layer vision
    tower (no stand-in fits a Qwen tower: 2-D rotary positions, 2 x 2 merger), 14 px patches, up to 48 x 48 merged
    tokens (:func:`~globalcom2.demo.tiny_qwen.build_tiny_qwen`).
    """
    from transformers.utils import logging as hf_logging

    from .encoder import load_standin_vision_tower
    from .tiny_model import build_tiny_llava_next

    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {list(FAMILIES)}, got {family!r}")
    hf_logging.disable_progress_bar()
    workdir = Path(workdir)
    text: dict[str, Any] = {
        "text_hidden": llm_hidden, "text_layers": llm_layers, "text_heads": max(llm_hidden // 64, 1)
    }  # fmt: skip
    if family == "llava_onevision":
        return build_tiny_llava_onevision(
            workdir / "llava_onevision_dinov2_standin", vision="dinov2", tile_size=378,
            vision_tower=load_standin_vision_tower(378), **text,
        )  # fmt: skip
    if family == "smolvlm":
        from .tiny_idefics3 import build_tiny_smolvlm

        return build_tiny_smolvlm(
            workdir / "smolvlm_dinov2_standin", vision="dinov2", tile_size=378, max_crops_per_side=4, **text
        )
    if family in ("gemma3", "aya_vision", "cohere2_vision"):
        from . import tiny_tiling

        size = {"gemma3": 896, "aya_vision": 364, "cohere2_vision": 448}[family]
        build = getattr(tiny_tiling, f"build_tiny_{family}")
        geometry = {"tokens_per_image": 256} if family == "gemma3" else {}
        return build(
            workdir / f"{family}_dinov2_standin",
            vision="dinov2",
            tile_size=size,
            patch_size=14,
            **geometry,
            **text,
        )
    if family == "llama4":
        from .tiny_tiling import build_tiny_llama4

        return build_tiny_llama4(
            workdir / "llama4_random_vision", tile_size=336, patch_size=14, max_patches=16, **text
        )
    if family == "idefics3":
        from .tiny_idefics3 import build_tiny_idefics3

        return build_tiny_idefics3(
            workdir / "idefics3_dinov2_standin", vision="dinov2", tile_size=378, max_crops_per_side=4, **text
        )
    from .tiny_qwen import QWEN_CLASSES, build_tiny_qwen

    if family in QWEN_CLASSES:  # Qwen-VL: the family's own tower class, random (docs/qwen.md)
        return build_tiny_qwen(
            workdir / f"{family}_random_vision", family=family, patch_size=14, max_side_tokens=48, **text
        )
    if family == "internvl":
        return build_tiny_internvl(
            workdir / "internvl_dinov2_standin", vision="dinov2", tile_size=448, max_patches=6,
            vision_tower=standin_internvl_vision_model(448), **text,
        )  # fmt: skip
    return build_tiny_llava_next(
        workdir / "llava_next_dinov2_standin", vision="dinov2", tile_size=336,
        vision_tower=load_standin_vision_tower(336), **text,
    )  # fmt: skip
