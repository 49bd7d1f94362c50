"""Where the [CLS]-row scores of paper Eq. 1 come from in each supported vision tower.

We need the last encoder layer, its pre-attention norm, its query/key projections and head count. Where the layer
runs anyway (features from the last layer), the scores are taken from the q and k the layer computes itself: the
outputs of the modules named by ``q_out`` / ``k_out`` (:class:`Tap`; a fused qkv projection is one module with two
slices), so scoring adds one small matmul per tile (:func:`globalcom2.core.scores.cls_scores_from_qk`). Where the
layer's output is not used (LLaVA-NeXT's layer -2), the layer is skipped and the scores are computed from its *input*
with its norm and projections (:func:`globalcom2.core.scores.cls_attention_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Tap:
    """Where a layer's q (or k) appears: the output of ``module``, last dim sliced ``[start:stop]`` (fused qkv)."""

    module: Any  # nn.Module
    start: int = 0
    stop: int | None = None

    def take(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.start == 0 and self.stop is None else output[..., self.start : self.stop]


@dataclass
class TowerInfo:
    """The pieces of a vision tower that scoring needs."""

    name: str
    last_layer: Any  # nn.Module: the last encoder layer
    norm: Any
    q_proj: Any
    k_proj: Any
    num_heads: int
    num_prefix_tokens: int  # [CLS] + register tokens before the patches
    has_cls: bool
    # the layer's own q / k (post-norm where the layer has q/k norms); None: not tapped
    q_out: Tap | None = None
    k_out: Tap | None = None
    # nn.Linear when the keys are exactly k_linear(norm(x)) (no k-norm): then scored without forming the keys
    k_linear: Any = None


def describe_tower(tower: Any) -> TowerInfo:
    """Find the scoring pieces of a CLIP, DINOv2 or SigLIP vision tower.

    Raises:
        UnsupportedModelError (a TypeError): for a tower we do not know, naming the supported ones.
    """
    cls_name = type(tower).__name__
    cfg: Any = getattr(tower, "config", None)
    if cls_name in ("CLIPVisionModel", "CLIPVisionTransformer", "CLIPVisionModelWithProjection"):
        vm = getattr(tower, "vision_model", tower)
        layer = vm.encoder.layers[-1]
        att = layer.self_attn
        return TowerInfo(
            "clip", layer, layer.layer_norm1, att.q_proj, att.k_proj, int(cfg.num_attention_heads), 1, True,
            Tap(att.q_proj), Tap(att.k_proj), att.k_proj,
        )  # fmt: skip
    if cls_name == "Dinov2Model":
        layer = tower.encoder.layer[-1]
        att = layer.attention
        q, k = (
            (att.q_proj, att.k_proj) if hasattr(att, "q_proj") else (att.attention.query, att.attention.key)
        )
        return TowerInfo(
            "dinov2", layer, layer.norm1, q, k, int(cfg.num_attention_heads),
            1 + int(getattr(cfg, "num_register_tokens", 0) or 0), True, Tap(q), Tap(k), k,
        )  # fmt: skip
    if cls_name in ("SiglipVisionModel", "SiglipVisionTransformer"):
        layer = getattr(tower, "vision_model", tower).encoder.layers[-1]  # skipped when its output is unused
        return TowerInfo("siglip", layer, None, None, None, int(cfg.num_attention_heads), 0, False)
    raise UnsupportedModelError(
        f"unsupported vision tower {cls_name}; GlobalCom² supports CLIPVisionModel, Dinov2Model "
        "([CLS] scores) and SiglipVisionModel (cosine scores, Eq. 7)"
    )
