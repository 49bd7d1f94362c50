"""vLLM out-of-tree model: LLaVA-NeXT with GlobalCom² in budget mode (paper Sec. 4, Eq. 1-6).

Budget mode is what makes vLLM possible: the number of visual tokens depends on the image size and R only, so the
multimodal processor reserves exactly that many ``<image>`` positions (KV cache, scheduling) before any forward,
and the model hands back exactly that many embeddings. What this module adds to vLLM's own LLaVA-NeXT:

- :class:`GlobalComLlavaNextProcessingInfo` overrides ``get_num_image_tokens`` with the budget-mode count of the
  LLaVA-NeXT geometry (:func:`num_image_tokens`: :func:`~globalcom2.adapters.anyres.anyres_geometry` and
  :meth:`~globalcom2.adapters.anyres.AnyresGeometry.num_tokens`, i.e. :func:`~globalcom2.core.budget.budget_counts`
  plus one newline per crop row: the count the transformers adapter patches into HF's processor);
- :class:`GlobalComLlavaNextForConditionalGeneration` computes the tile features with vLLM's own vision tower and
  projector and the per-tile [CLS]-row scores (Eq. 1) of the tower's **last** layer, packs each image with vLLM's
  own LLaVA-NeXT packing (unpadding + newlines) and keeps the rows picked by
  :func:`~globalcom2.adapters.anyres.plan_anyres`, the plan the transformers adapter makes: allocation (Eq. 2-4),
  holistic scores (Eq. 5) and selection (Eq. 6) by :func:`~globalcom2.core.select.select_tokens`.

vLLM builds the vision tower only up to the feature layer (``vision_feature_layer=-2``: all layers but the last).
The last layer's *input* is therefore exactly the tower's output; :class:`ClsScorer` holds the last layer's
pre-attention LayerNorm and q/k/v projection (loaded from the checkpoint's last-layer weights) and computes the
[CLS] query row against the patch keys from it, never a full attention map.

Tensor parallelism: the scorer's qkv projection is column-parallel like the tower's attention, so each rank holds
``H / tp`` heads. Each rank sums its heads' [CLS] rows, an all-reduce adds the sums, and dividing by the total H
gives the head mean of Eq. 1 on every rank (same plan everywhere). Untested here: this machine has one CPU and no
GPUs; the single-rank path is what the tests run.

Switched on per model (see docs/engines.md)::

    vllm serve llava-hf/llava-v1.6-mistral-7b-hf --hf-overrides \\
      '{"architectures": ["GlobalCom2LlavaNextForConditionalGeneration"], "globalcom2": {"ratio": 0.25}}'

or for every LLaVA-NeXT model of the process: ``GLOBALCOM2_VLLM='{"ratio": 0.25}' vllm serve ...``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters.anyres import AnyresGeometry, anyres_geometry, plan_anyres
from ..config import GlobalComConfig
from ..core.plan import Plan
from ..core.scores import cls_attention_scores, cosine_scores
from ..extras import MissingDependencyError, install_command

try:
    from vllm.config import VllmConfig
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.models.clip import CLIPVisionModel
    from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
    from vllm.model_executor.models.llava_next import (
        LlavaNextForConditionalGeneration,
        LlavaNextImageEmbeddingInputs,
        LlavaNextMultiModalProcessor,
        LlavaNextProcessingInfo,
    )
    from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
    from vllm.model_executor.models.vision import is_vit_use_data_parallel
    from vllm.multimodal import MULTIMODAL_REGISTRY
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.vllm needs vLLM (>=0.32,<0.33): {install_command('vllm')}", name="vllm"
    ) from exc

from . import VLLM_ARCHITECTURE as ARCHITECTURE
from . import VLLM_CONFIG_KEY as CONFIG_KEY
from . import VLLM_ENV_VAR as ENV_VAR
from . import register_vllm as register


def options_from_config(hf_config: Any) -> GlobalComConfig:
    """The GlobalCom² options of a model: ``hf_config.globalcom2`` if set, else the ``GLOBALCOM2_VLLM`` JSON.

    Raises:
        ValueError / TypeError: invalid options, or ``mode="reference"`` (its counts depend on the scores, which
            vLLM's processor cannot know before the forward).
    """
    raw: Any = getattr(hf_config, CONFIG_KEY, None) if hf_config is not None else None
    source = f"hf_config.{CONFIG_KEY}"
    if raw is None:
        raw, source = os.environ.get(ENV_VAR) or "{}", ENV_VAR
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} must be a JSON object of GlobalCom² options, got {raw!r}") from exc
    if not isinstance(raw, Mapping):
        raise TypeError(f"{source} must be a mapping of GlobalCom² options, got {type(raw).__name__} {raw!r}")
    config = GlobalComConfig.from_kwargs(**dict(raw))
    if config.mode != "budget":
        raise ValueError(
            f"vLLM needs mode='budget' (got {config.mode!r}): reference-mode token counts depend on the scores, "
            "but vLLM reserves the image positions before the forward"
        )
    return config


def image_geometry(
    hf_config: Any, tile_size: int, patches_per_side: int, height: int, width: int
) -> AnyresGeometry:
    """LLaVA-NeXT tiling of one ``height x width`` image (crop grid, valid box), as vLLM's processor cuts it."""
    return anyres_geometry((height, width), hf_config.image_grid_pinpoints, tile_size, patches_per_side)


def num_image_tokens(hf_config: Any, tile_size: int, patches_per_side: int, height: int, width: int) -> int:
    """Image tokens one ``height x width`` image gets in budget mode (processor and model agree through this)."""
    geo = image_geometry(hf_config, tile_size, patches_per_side, height, width)
    return geo.num_tokens(options_from_config(hf_config).ratio)


class GlobalComLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing info with the budget-mode placeholder count."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        encoder = self.get_vision_encoder_info()
        return num_image_tokens(
            self.get_hf_config(),
            encoder.get_image_size(),
            encoder.get_patch_grid_length(),
            image_height,
            image_width,
        )


class ClsScorer(nn.Module):
    """The vision tower's last layer, as far as [CLS]-row scores need it (paper Eq. 1): pre-norm and q/k(/v).

    Loaded from the checkpoint's last-layer weights (``layer_norm1``, ``self_attn.{q,k,v}_proj``); the rest of that
    layer is never built. Tensor-parallel like the tower's own attention.
    """

    def __init__(self, vision_config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__()
        hidden = int(vision_config.hidden_size)
        self.num_heads = int(vision_config.num_attention_heads)
        use_data_parallel = is_vit_use_data_parallel()
        self.tp_size = 1 if use_data_parallel else get_tensor_model_parallel_world_size()
        if self.num_heads % self.tp_size:
            raise ValueError(f"{self.num_heads} vision heads cannot be split over {self.tp_size} ranks")
        self.num_local_heads = self.num_heads // self.tp_size
        self.layer_norm1 = nn.LayerNorm(hidden, eps=vision_config.layer_norm_eps)
        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden,
            head_size=hidden // self.num_heads,
            total_num_heads=self.num_heads,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            disable_tp=use_data_parallel,
        )

    def forward(self, hidden: torch.Tensor, kind: str = "logits") -> torch.Tensor:
        """Head-mean [CLS]-row scores.

        Args:
            hidden: ``(T, 1 + N, D)`` input of the last layer ([CLS] first).
            kind: ``"logits"`` or ``"softmax"`` (see :func:`globalcom2.core.scores.cls_attention_scores`).

        Returns:
            ``(T, N)`` float32, identical on every tensor-parallel rank.
        """
        qkv, _ = self.qkv_proj(self.layer_norm1(hidden))
        q, k, _ = qkv.chunk(3, dim=-1)  # this rank's heads
        # The fused projection already ran; hand its q/k to the shared scoring function (norm done above).
        local = cls_attention_scores(
            hidden, norm=lambda x: x, q_proj=lambda _x: q[:, :1], k_proj=lambda _x: k,
            num_heads=self.num_local_heads, kind=kind,
        )  # fmt: skip
        if self.tp_size == 1:
            return local
        # Mean over all H heads = (sum over ranks of each rank's head sum) / H.
        return tensor_model_parallel_all_reduce(local * self.num_local_heads) / self.num_heads

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``layer_norm1.*`` and ``self_attn.{q,k,v}_proj.*`` of the last layer; skip the rest of it."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards = {"self_attn.q_proj.": "q", "self_attn.k_proj.": "k", "self_attn.v_proj.": "v"}
        for name, weight in weights:
            for src, shard in shards.items():
                if name.startswith(src):
                    target = "qkv_proj." + name[len(src) :]
                    if target in params:
                        params[target].weight_loader(params[target], weight, shard)  # type: ignore[attr-defined]
                        loaded.add(target)
                    break
            else:
                if name in params:  # layer_norm1.weight / .bias
                    loader = getattr(params[name], "weight_loader", default_weight_loader)
                    loader(params[name], weight)
                    loaded.add(name)
        return loaded


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=GlobalComLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class GlobalComLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with GlobalCom² (budget mode): the image embeddings of each image are its kept tokens.

    Options come from ``hf_config.globalcom2`` (``--hf-overrides``) or ``GLOBALCOM2_VLLM``; see
    :func:`options_from_config`. ``importance="auto"`` uses [CLS] scores for CLIP towers and Eq. 7 (cosine to the
    tile mean, on the selected features) otherwise.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom_config = options_from_config(config)
        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"GlobalCom² needs vision_feature_select_strategy='default' (patch tokens only), got {strategy!r}"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"GlobalCom² supports a single vision_feature_layer, got {config.vision_feature_layer!r}"
            )
        vcfg = config.vision_config
        self.globalcom_tile = int(vcfg.image_size)
        self.globalcom_grid = self.globalcom_tile // int(vcfg.patch_size)
        is_clip = isinstance(self.vision_tower, CLIPVisionModel)
        importance = self.globalcom_config.importance
        if importance == "auto":
            importance = "cls" if is_clip else "cosine"
        self.globalcom_importance = importance
        self.globalcom_scorer: ClsScorer | None = None
        self.globalcom_plans: list[Plan] = []  # plans of the last batch of images (inspection and tests)
        if importance == "cls":
            if not is_clip:
                raise ValueError(
                    f"importance='cls' needs a CLIP vision tower with [CLS]; got {type(self.vision_tower).__name__} "
                    "(use importance='cosine' or 'auto')"
                )
            num_layers = int(vcfg.num_hidden_layers)
            built = len(self.vision_tower.vision_model.encoder.layers)
            if built != num_layers - 1:
                raise ValueError(
                    f"GlobalCom² [CLS] scores need vision_feature_layer=-2 (the last layer's input is the features);"
                    f" this model uses {config.vision_feature_layer!r} ({built} of {num_layers} layers built). "
                    "Use importance='cosine'."
                )
            with self._mark_tower_model(vllm_config, "image"):
                self.globalcom_scorer = ClsScorer(
                    vcfg, vllm_config.quant_config, prefix=maybe_prefix(prefix, "globalcom_scorer")
                )
            # The last layer's weights (dropped by vLLM's tower, which stops before it) feed the scorer.
            self.hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
                orig_to_new_prefix={
                    f"vision_tower.vision_model.encoder.layers.{num_layers - 1}.": "globalcom_scorer."
                }
            )

    def _process_image_input(self, image_input: Any) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return image_input[
                "data"
            ]  # precomputed embeddings: nothing to score; counted by their own length
        pixel_values = image_input["pixel_values"]
        per_image = list(pixel_values)  # (B, tiles, C, H, W) tensor or a list of (tiles_i, C, H, W)
        num_tiles = [int(p.shape[0]) for p in per_image]
        stacked = torch.cat(per_image)
        if self.globalcom_scorer is not None:
            # Tower built up to layer L-1: its output, [CLS] included, is the last layer's input.
            hidden = self.vision_tower(stacked, select_layers=None, feature_select_strategy=None)
            scores = self.globalcom_scorer(hidden, kind=self.globalcom_config.score)
            features = hidden[:, 1:]  # "default" strategy: drop [CLS]
        else:
            features = self._image_pixels_to_features(self.vision_tower, stacked)
            scores = cosine_scores(features)  # Eq. 7
        embeds = self.multi_modal_projector(features)
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            image_sizes = torch.tensor([[self.globalcom_tile, self.globalcom_tile]] * len(per_image))
        out, plans = [], []
        for tiles, tile_scores, size in zip(
            embeds.split(num_tiles), scores.split(num_tiles), image_sizes, strict=True
        ):
            packed, plan = self._globalcom_pack(tiles, tile_scores, size)
            out.append(packed)
            plans.append(plan)
        self.globalcom_plans = plans
        return out

    def _globalcom_pack(
        self, tiles: torch.Tensor, scores: torch.Tensor, size: torch.Tensor
    ) -> tuple[torch.Tensor, Plan]:
        """Kept embeddings of one image: the rows :func:`~globalcom2.adapters.anyres.plan_anyres` picks from
        vLLM's own packed sequence (thumbnail, then the unpadded crop grid row by row with a newline per row).

        Args:
            tiles: ``(1 + n, N, H_llm)`` projected features (padding tiles beyond the image's grid allowed).
            scores: ``(1 + n, N)`` importance per tile.
            size: ``(2,)`` original (height, width).
        """
        height, width = (int(v) for v in size.tolist())
        geo = image_geometry(self.config, self.globalcom_tile, self.globalcom_grid, height, width)
        n = 1 + geo.grid[0] * geo.grid[1]
        if tiles.shape[0] < n:
            raise ValueError(f"image {height}x{width} needs {n} tiles, got {tiles.shape[0]}")
        packed = self._merge_image_patch_embeddings(size, tiles[:n], strategy="spatial_unpad")
        plan, index = plan_anyres(scores[:n], geo, self.globalcom_config)
        if packed.shape[0] != plan.num_tokens_full:
            raise RuntimeError(
                f"GlobalCom²: vLLM packed {packed.shape[0]} embeddings for an image of {height}x{width}, the "
                f"LLaVA-NeXT geometry gives {plan.num_tokens_full}; this vLLM version packs differently"
            )
        kept = packed[index.to(packed.device)]
        reserved = geo.num_tokens(self.globalcom_config.ratio)  # the processor's count (num_image_tokens)
        if kept.shape[0] != reserved:
            raise RuntimeError(f"GlobalCom²: kept {kept.shape[0]} embeddings for {reserved} positions")
        return kept, plan


__all__ = [
    "ARCHITECTURE",
    "CONFIG_KEY",
    "ENV_VAR",
    "ClsScorer",
    "GlobalComLlavaNextForConditionalGeneration",
    "GlobalComLlavaNextProcessingInfo",
    "image_geometry",
    "num_image_tokens",
    "options_from_config",
    "register",
]
