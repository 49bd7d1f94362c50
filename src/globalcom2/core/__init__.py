"""Pure-torch core of GlobalCom²: scores, allocation, selection, geometry and the `Plan` record.

Imports torch only; knows nothing about CLIP, LLaVA or Hugging Face.
"""

from .allocation import ALLOCATIONS, allocate_ratios, crop_richness
from .budget import budget_num_tokens, full_num_tokens, split_budget
from .geometry import global_submaps, thumbnail_region_map, valid_box
from .plan import Plan
from .planner import plan_image, plan_single_tile
from .scores import SCORE_KINDS, cls_attention_scores, cosine_scores
from .selection import SCORINGS, holistic_scores, topk_mask

__all__ = [
    "ALLOCATIONS",
    "SCORE_KINDS",
    "SCORINGS",
    "Plan",
    "allocate_ratios",
    "budget_num_tokens",
    "cls_attention_scores",
    "cosine_scores",
    "crop_richness",
    "full_num_tokens",
    "global_submaps",
    "holistic_scores",
    "plan_image",
    "plan_single_tile",
    "split_budget",
    "thumbnail_region_map",
    "topk_mask",
    "valid_box",
]
