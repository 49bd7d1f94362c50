"""One image in, one `Plan` and one emission index out: the whole GlobalCom² pipeline (paper Sec. 4, Eq. 2-6).

Inputs are per-tile importance scores (thumbnail + crops) and the tiling geometry; the model family does not
matter here. Two modes share every step except the per-crop counts and the emission order:

- reference: k_j = int(N_j * r_j); thumbnail in descending score order; crop tokens in the official packed-slot
  layout with a newline after each of the rows*g padded rows (DESIGN.md §3).
- budget: crops share K = int(R * sum N_j) tokens by the same r_j * N_j weights; raster order; newline per valid
  row (module :mod:`globalcom2.core.budget`).
"""

from __future__ import annotations

import torch

from .allocation import allocate_ratios
from .budget import budget_num_tokens, full_num_tokens, split_budget
from .geometry import (
    global_submaps,
    grid_to_tiles,
    thumbnail_region_map,
    tiles_to_grid,
    valid_box,
    valid_grid_mask,
)
from .plan import Plan
from .selection import emission_index, holistic_scores, packed_slots, raster_slots, topk_mask


def plan_single_tile(g: int, device=None) -> tuple[Plan, torch.Tensor]:
    """Images that produce a single tile are not compressed: all g*g tokens plus one newline."""
    n = g * g
    plan = Plan(
        grid=(0, 0),
        thumbnail_mask=torch.ones(g, g, dtype=torch.bool, device=device),
        crops_mask=torch.zeros(0, 0, dtype=torch.bool, device=device),
        crop_ratios=torch.zeros(0, device=device),
        num_tokens=n + 1,
        num_tokens_full=n + 1,
        thumbnail_order=torch.arange(n, device=device),
    )
    return plan, torch.arange(n + 1, device=device)


def plan_image(
    thumb_scores: torch.Tensor,
    crop_scores: torch.Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    ratio: float,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
) -> tuple[Plan, torch.Tensor]:
    """Compress one anyres image.

    Args:
        thumb_scores: ``(g*g,)`` importance of the thumbnail tokens (s^G, Eq. 1).
        crop_scores: ``(rows*cols, g*g)`` importance of every crop's tokens (s^L), row-major crops.
        grid: ``(rows, cols)``.
        image_size: original ``(height, width)`` in pixels.
        ratio, mode, allocation, scoring, alpha, tau: see :class:`globalcom2.GlobalComConfig`.

    Returns:
        ``(plan, index)``: ``index`` picks the token sequence from ``cat(features.flatten(0, 1), newline)`` where
        features are ``(1 + rows*cols, g*g, D)`` with the thumbnail first (see :func:`emission_index`).
    """
    rows, cols = grid
    n, gg = crop_scores.shape
    if n != rows * cols:
        raise ValueError(f"got scores for {n} crops but the grid {rows}x{cols} has {rows * cols}")
    g = int(round(gg**0.5))
    device = crop_scores.device
    height, width = image_size
    box = valid_box(height, width, rows * g, cols * g)
    thumb = thumb_scores.float().reshape(-1)

    # Thumbnail: keep int(N * R) tokens by the thumbnail's own scores.
    k0 = int(gg * ratio)
    thumb_rank_order = torch.sort(thumb, descending=True, stable=True).indices[:k0]
    thumbnail_mask = torch.zeros(gg, dtype=torch.bool, device=device)
    thumbnail_mask[thumb_rank_order] = True

    # Adaptive compression adjustment (Eq. 2-4).
    region = thumbnail_region_map(g, rows, cols, device=device)
    r = allocate_ratios(thumb, region, n, ratio=ratio, allocation=allocation, tau=tau)

    # Holistic token evaluation (Eq. 5) over the unpadded tokens of every crop.
    valid = grid_to_tiles(valid_grid_mask(rows * g, cols * g, box, device=device), rows, cols).reshape(n, gg)
    submaps = global_submaps(thumb, rows, cols, box).reshape(n, gg)
    s = holistic_scores(crop_scores, submaps, valid, scoring=scoring, alpha=alpha)
    num_valid = valid.sum(-1)

    if mode == "reference":
        # uniform keeps exactly int(N_j * R) per crop (FasterVLM-style top-k, as the thumbnail's int(N * R));
        # a float32 copy of R would drop one token where N_j * R is an integer (0.7 -> 0.69999999 * 10 = 6.99...).
        r_exact = torch.full_like(r, ratio, dtype=torch.float64) if allocation == "uniform" else r.double()
        k = (num_valid.double() * r_exact).floor().long()
        keep = topk_mask(s, k, valid)
        slots = packed_slots(keep, valid)
        newline_rows = torch.ones(rows * g, dtype=torch.bool, device=device)
        thumb_order = thumb_rank_order
    elif mode == "budget":
        total = int(ratio * ((box[1] - box[0]) * (box[3] - box[2])))  # as budget_num_tokens
        k = split_budget(total, r.double() * num_valid, num_valid)
        keep = topk_mask(s, k, valid)
        slots = raster_slots(keep)
        newline_rows = (torch.arange(rows * g, device=device) >= box[0]) & (
            torch.arange(rows * g, device=device) < box[1]
        )
        thumb_order = thumbnail_mask.nonzero().reshape(-1)
    else:
        raise ValueError(f"`mode` must be 'budget' or 'reference', got {mode!r}")

    index = emission_index(
        thumb_order=thumb_order, crop_slots=slots, rows=rows, cols=cols, newline_rows=newline_rows
    )
    num_tokens = (
        budget_num_tokens(height, width, rows, cols, g, ratio) if mode == "budget" else int(index.numel())
    )
    plan = Plan(
        grid=(rows, cols),
        thumbnail_mask=thumbnail_mask.reshape(g, g),
        crops_mask=tiles_to_grid(keep.reshape(n, g, g), rows, cols),
        crop_ratios=r,
        num_tokens=num_tokens,
        num_tokens_full=full_num_tokens(height, width, rows, cols, g),
        valid_box=box,
        crop_keep_counts=k,
        crop_valid_counts=num_valid,
        mode=mode,
        thumbnail_order=thumb_order,
    )
    return plan, index
