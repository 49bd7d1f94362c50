"""Pure-torch core of GlobalCom²: scores, allocation, the one selection, counts and the `Plan` record.

Imports torch only and names no model family: adapters reduce a tiled image to tensors (thumbnail scores, a crop
table, valid cells, sub-maps, the region map: a :class:`SelectionInput` per image) and call :func:`select_images`
once for all images of a forward (:func:`select_tokens` for one).
"""

from .allocation import ALLOCATIONS, allocate_ratios, crop_richness
from .budget import budget_counts, split_budget
from .layout import CropLayout, grid_to_tiles, thumbnail_region_map, tiles_to_grid
from .plan import Plan
from .ranking import descending_rank, top_indices, topk_mask
from .resize import bilinear_resize
from .scores import SCORE_KINDS, cls_attention_scores, cosine_scores
from .select import (
    MODES,
    SCORINGS,
    BatchSelection,
    Selection,
    SelectionInput,
    holistic_scores,
    kept_crop_tokens,
    select_batch,
    select_images,
    select_tokens,
)
from .sums import exact_segment_sum, exact_sum

__all__ = [
    "ALLOCATIONS",
    "MODES",
    "SCORE_KINDS",
    "SCORINGS",
    "BatchSelection",
    "CropLayout",
    "Plan",
    "Selection",
    "SelectionInput",
    "allocate_ratios",
    "bilinear_resize",
    "budget_counts",
    "cls_attention_scores",
    "cosine_scores",
    "crop_richness",
    "descending_rank",
    "exact_segment_sum",
    "exact_sum",
    "grid_to_tiles",
    "holistic_scores",
    "kept_crop_tokens",
    "select_batch",
    "select_images",
    "select_tokens",
    "split_budget",
    "thumbnail_region_map",
    "tiles_to_grid",
    "top_indices",
    "topk_mask",
]
