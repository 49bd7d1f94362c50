"""Where the [CLS]-row scores of paper Eq. 1 come from in each supported vision tower.

We need the last encoder layer's pre-attention norm, its query/key projections and head count; the scores are
then computed from that layer's *input* (:func:`globalcom2.core.scores.cls_attention_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModelError


@dataclass
class TowerInfo:
    """The pieces of a vision tower that scoring needs."""

    name: str
    last_layer: Any  # nn.Module, or None for towers without [CLS]
    norm: Any
    q_proj: Any
    k_proj: Any
    num_heads: int
    num_prefix_tokens: int  # [CLS] + register tokens before the patches
    has_cls: bool


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
        return TowerInfo(
            "clip", layer, layer.layer_norm1, layer.self_attn.q_proj, layer.self_attn.k_proj,
            int(cfg.num_attention_heads), 1, True,
        )  # fmt: skip
    if cls_name == "Dinov2Model":
        layer = tower.encoder.layer[-1]
        att = layer.attention
        q, k = (
            (att.q_proj, att.k_proj) if hasattr(att, "q_proj") else (att.attention.query, att.attention.key)
        )
        return TowerInfo(
            "dinov2", layer, layer.norm1, q, k, int(cfg.num_attention_heads),
            1 + int(getattr(cfg, "num_register_tokens", 0) or 0), True,
        )  # fmt: skip
    if cls_name in ("SiglipVisionModel", "SiglipVisionTransformer"):
        return TowerInfo("siglip", None, None, None, None, int(cfg.num_attention_heads), 0, False)
    raise UnsupportedModelError(
        f"unsupported vision tower {cls_name}; GlobalCom² supports CLIPVisionModel, Dinov2Model "
        "([CLS] scores) and SiglipVisionModel (cosine scores, Eq. 7)"
    )
