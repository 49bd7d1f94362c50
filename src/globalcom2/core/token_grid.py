"""GlobalCom² on the crop tokens the LLM actually receives, when these are not one token per ViT patch.

Paper Eq. 2-6 select tokens of the crops; :func:`~globalcom2.core.planner.plan_image` does this on LLaVA-NeXT's
grid, where every crop token is one ViT patch. Two families hand the LLM a different grid:

* **LLaVA-OneVision** (``anyres_max_N``) unpads the crop grid like LLaVA-NeXT, and when the unpadded ``h x w``
  grid holds more than 1.1² x N tiles' worth of tokens it bilinearly down-samples it to ``(int(h // s), int(w // s))``
  with ``s = sqrt(h*w / (N*g*g))`` (:func:`anyres_max_shape`). A down-sampled token mixes up to four patches.
* **InternVL** merges every 2 x 2 patches into one token by pixel shuffle (:func:`merge_pool` pools patch scores to
  that grid); there is no padding, and the thumbnail comes last.

Both are described here as a **token grid** ``(H, W)`` cut into ``rows x cols`` rectangular crop blocks: grid row
``y`` belongs to crop row ``row_block[y]``, grid column ``x`` to crop column ``col_block[x]``. For LLaVA-NeXT's own
geometry the blocks are the crops' unpadded parts and :func:`select_on_grid` gives exactly ``plan_image``'s masks.
Crop richness (Eq. 2) is still read from the thumbnail's regions (:func:`thumbnail_region_map`), Eq. 3-4 give r_j,
the global sub-maps (Eq. 5) are the thumbnail score map bilinearly resized to the token grid and cut into the
blocks, and Eq. 6 keeps the top tokens of every block. Everything is vectorised over crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .allocation import allocate_ratios
from .budget import split_budget
from .geometry import thumbnail_region_map
from .plan import Plan
from .selection import holistic_scores, topk_mask


# -- counts --------------------------------------------------------------------------------------------------
def budget_counts(num_thumb_tokens: int, grid_height: int, grid_width: int, ratio: float) -> tuple[int, int]:
    """Budget mode: (thumbnail tokens kept, crop tokens kept) = (int(N * R), int(R * (H * W))).

    One function for the processor-side count and the model-side selection, so that they cannot drift. The
    integer product comes first, as in :func:`~globalcom2.core.budget.budget_num_tokens` (R * h * w rounds
    differently from R * (h * w)).
    """
    return int(num_thumb_tokens * ratio), int(ratio * (grid_height * grid_width))


def parse_anyres_max(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9 (the tile budget of OneVision's down-sampling rule)."""
    prefix = "anyres_max_"
    rest = vision_aspect_ratio[len(prefix) :] if vision_aspect_ratio.startswith(prefix) else ""
    if not rest.isdigit() or int(rest) <= 0:
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(rest)


def anyres_max_shape(height: int, width: int, g: int, max_tiles: int) -> tuple[int, int]:
    """Token grid of OneVision's crops after down-sampling (HF ``pack_image_features``, ``anyres_max_N``).

    Args:
        height, width: the unpadded crop grid, in patch cells.
        g: patches per tile side.
        max_tiles: N of ``anyres_max_N``.

    Returns:
        ``(H, W)``: unchanged when ``s = sqrt(h*w / (N*g*g)) <= 1.1``, else ``(int(h // s), int(w // s))``.
    """
    scale = math.sqrt(height * width / (max_tiles * g**2))
    if scale > 1.1:
        return int(height // scale), int(width // scale)
    return height, width


# -- grids -----------------------------------------------------------------------------------------------------
def resample_blocks(
    valid_height: int, valid_width: int, top: int, left: int, grid_height: int, grid_width: int, g: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop blocks of a token grid that was resized from the unpadded crop grid.

    Token (y, x) of the ``grid_height x grid_width`` grid is anchored at the patch nearest to its bilinear sample
    point: row ``top + floor((y + 0.5) * valid_height / grid_height)`` of the padded crop grid (the same for columns),
    and belongs to the crop holding that patch. Without resizing the anchor is the token's own patch.

    Returns:
        ``(row_block (H,), col_block (W,), anchor_rows (H,), anchor_cols (W,))``, Long; blocks are crop row / column
        indices, anchors are rows / columns of the padded ``(rows*g) x (cols*g)`` grid.
    """
    y = torch.arange(grid_height)
    x = torch.arange(grid_width)
    anchor_rows = top + ((2 * y + 1) * valid_height) // max(2 * grid_height, 1)
    anchor_cols = left + ((2 * x + 1) * valid_width) // max(2 * grid_width, 1)
    return anchor_rows // g, anchor_cols // g, anchor_rows, anchor_cols


def resize_map(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, float32) of a 2-D score map; the call HF uses on features."""
    if tuple(scores.shape) == tuple(size):
        return scores.float()
    if size[0] == 0 or size[1] == 0:
        return scores.new_zeros(size, dtype=torch.float32)
    return F.interpolate(scores.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def merge_pool(scores: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Sum patch scores over the ``factor x factor`` groups that pixel shuffle merges into one token (InternVL).

    Summing keeps the crop richness S_j of Eq. 2 equal to the sum over the crop's patches, and within a tile it
    ranks tokens as the mean would.

    Args:
        scores: ``(T, g*g)`` per-patch scores in raster order.

    Returns:
        ``(T, (g/factor)**2)`` in raster order of the merged grid.
    """
    t, gg = scores.shape
    g = int(round(gg**0.5))
    if g * g != gg or g % factor:
        raise ValueError(f"cannot merge a {g}x{g} patch grid ({gg} scores) by {factor}x{factor}")
    m = g // factor
    return scores.reshape(t, m, factor, m, factor).sum(dim=(2, 4)).reshape(t, m * m)


def footprint(
    token_mask: torch.Tensor, box: tuple[int, int, int, int], padded: tuple[int, int]
) -> torch.Tensor:
    """Spread a token-grid mask back onto the padded patch grid (each patch takes the token that covers it).

    Patch ``(top + i, left + j)`` of the unpadded area lies under token ``(i * H // h, j * W // w)``; padding
    stays False. Used to draw a down-sampled OneVision plan on the crop canvas.
    """
    top, bottom, left, right = box
    h, w = bottom - top, right - left
    out = torch.zeros(padded, dtype=torch.bool, device=token_mask.device)
    big, small = token_mask.shape
    if h > 0 and w > 0 and big > 0 and small > 0:
        ri = torch.arange(h, device=token_mask.device) * big // h
        ci = torch.arange(w, device=token_mask.device) * small // w
        out[top:bottom, left:right] = token_mask[ri][:, ci]
    return out


# -- selection -------------------------------------------------------------------------------------------------
@dataclass
class GridSelection:
    """Kept tokens of one image on a token grid (see the module docstring).

    Attributes:
        thumbnail_mask: Bool ``(gt, gt)``.
        thumbnail_order: Long ``(k0,)`` thumbnail token indices in emission order (raster in budget mode,
            descending score in reference mode).
        keep: Bool ``(H, W)`` kept crop tokens.
        crop_ratios: ``(rows*cols,)`` r_j (Eq. 4).
        crop_keep_counts, crop_valid_counts: Long ``(rows*cols,)`` kept / available tokens per crop block.
    """

    thumbnail_mask: torch.Tensor
    thumbnail_order: torch.Tensor
    keep: torch.Tensor
    crop_ratios: torch.Tensor
    crop_keep_counts: torch.Tensor
    crop_valid_counts: torch.Tensor


def select_on_grid(
    thumb_scores: torch.Tensor,
    local_map: torch.Tensor,
    row_block: torch.Tensor,
    col_block: torch.Tensor,
    grid: tuple[int, int],
    *,
    ratio: float,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
    global_map: torch.Tensor | None = None,
    crop_budget: int | None = None,
) -> GridSelection:
    """GlobalCom² (Eq. 2-6) for one image whose crop tokens form a ``(H, W)`` grid of rectangular crop blocks.

    Args:
        thumb_scores: ``(gt*gt,)`` thumbnail token scores s^G.
        local_map: ``(H, W)`` each crop token's own score s^L, in grid layout.
        row_block, col_block: Long ``(H,)`` / ``(W,)`` crop row / column of every grid row / column
            (non-decreasing; a crop may own no row or column).
        grid: ``(rows, cols)`` of crops.
        ratio, mode, allocation, scoring, alpha, tau: see :class:`globalcom2.GlobalComConfig`.
        global_map: ``(H, W)`` global sub-maps ŝ^G; default: the thumbnail map bilinearly resized to ``(H, W)``.
        crop_budget: budget mode's crop total K; default ``int(R * H * W)`` (:func:`budget_counts`). A family
            whose processor counts from other quantities passes its own count here.

    Returns:
        A :class:`GridSelection`. Budget mode keeps ``int(R * H * W)`` crop tokens split by r_j * N_j
        (:func:`~globalcom2.core.budget.split_budget`); reference mode keeps ``int(N_j * r_j)`` per crop.
    """
    rows, cols = grid
    n = rows * cols
    device = local_map.device
    thumb = thumb_scores.float().reshape(-1).to(device)
    gt = int(round(thumb.numel() ** 0.5))
    height, width = local_map.shape

    k0, total = budget_counts(gt * gt, height, width, ratio)
    total = total if crop_budget is None else crop_budget
    thumb_rank_order = torch.sort(thumb, descending=True, stable=True).indices[:k0]
    thumbnail_mask = torch.zeros(gt * gt, dtype=torch.bool, device=device)
    thumbnail_mask[thumb_rank_order] = True

    # Eq. 2-4 on the thumbnail's crop regions.
    region = thumbnail_region_map(gt, rows, cols, device=device)
    r = allocate_ratios(thumb, region, n, ratio=ratio, allocation=allocation, tau=tau)

    # Lay every crop block out as one row of an (n, M) table (raster order inside the block), so that the
    # per-crop normalisation and top-k of the core run unchanged.
    row_block, col_block = row_block.to(device), col_block.to(device)
    block_h = torch.bincount(row_block, minlength=rows)
    block_w = torch.bincount(col_block, minlength=cols)
    row_off = torch.cumsum(block_h, 0) - block_h
    col_off = torch.cumsum(block_w, 0) - block_w
    m = max(int(block_h.max()) * int(block_w.max()), 1) if height and width else 1
    a, b = row_block[:, None], col_block[None, :]
    within = (torch.arange(height, device=device)[:, None] - row_off[a]) * block_w[b] + (
        torch.arange(width, device=device)[None, :] - col_off[b]
    )
    slot = ((a * cols + b) * m + within).reshape(-1)  # (H*W,) position in the flattened (n, M) table
    if global_map is None:
        global_map = resize_map(thumb.reshape(gt, gt), (height, width))

    def table(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((n * m,), fill, dtype=values.dtype, device=device)
        return out.index_copy(0, slot, values.reshape(-1)).reshape(n, m)

    valid = table(torch.ones(height * width, dtype=torch.bool, device=device), False)
    s = holistic_scores(
        table(local_map.float(), 0.0), table(global_map.float(), 0.0), valid, scoring=scoring, alpha=alpha
    )
    num_valid = valid.sum(-1)
    if mode == "reference":
        # uniform keeps exactly int(N_j * R), as plan_image (a float32 copy of R can lose one token).
        r_exact = torch.full_like(r, ratio, dtype=torch.float64) if allocation == "uniform" else r.double()
        k = (num_valid.double() * r_exact).floor().long()
        thumb_order = thumb_rank_order
    elif mode == "budget":
        k = split_budget(total, r.double() * num_valid, num_valid)
        thumb_order = thumbnail_mask.nonzero().reshape(-1)
    else:
        raise ValueError(f"`mode` must be 'budget' or 'reference', got {mode!r}")
    keep = topk_mask(s, k, valid).reshape(-1)[slot].reshape(height, width)
    return GridSelection(
        thumbnail_mask=thumbnail_mask.reshape(gt, gt),
        thumbnail_order=thumb_order,
        keep=keep,
        crop_ratios=r,
        crop_keep_counts=k,
        crop_valid_counts=num_valid,
    )


@dataclass
class GridPlan(Plan):
    """A :class:`~globalcom2.core.plan.Plan` whose crop tokens live on a resampled grid (OneVision).

    ``crops_mask`` stays on the padded patch grid for drawing: every patch shows whether the token covering it
    was kept (:func:`footprint`). The LLM-side record is ``token_mask``.

    Attributes:
        token_mask: Bool ``(H, W)`` kept crop tokens on the grid the LLM receives (row-major, one newline per row).
        token_grid: ``(H, W)``.
    """

    token_mask: torch.Tensor | None = None
    token_grid: tuple[int, int] = (0, 0)

    def summary(self) -> dict:
        out = super().summary()
        if self.token_mask is not None:
            out["crops_kept"] = int(self.token_mask.sum())
            out["token_grid"] = list(self.token_grid)
        return out


__all__ = [
    "GridPlan",
    "GridSelection",
    "anyres_max_shape",
    "budget_counts",
    "footprint",
    "merge_pool",
    "parse_anyres_max",
    "resample_blocks",
    "resize_map",
    "select_on_grid",
]
