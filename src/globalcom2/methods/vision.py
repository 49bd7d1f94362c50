"""Pre-LLM baselines: FasterVLM-style top-k and random on every family, spatial average pooling on LLaVA-NeXT.

Each is the GlobalCom² pipeline with one step swapped (a different score or a different allocation, see
docs/design.md §1): the same install path, scoring hook, packing, placeholder checks and processor patch as
:func:`globalcom2.apply`, so the processor emits exactly as many placeholders as features are produced.

- **FasterVLM-style** (no subclass, only a config: :data:`FASTERVLM`, so every family runs it): every tile keeps its
  top tokens by its *own* score at the uniform ratio R -- its [CLS] attention (paper Eq. 1, softmax probabilities
  as in FasterVLM) where the tower has a [CLS] (CLIP, InternViT), Eq. 7 (minus the cosine to the tile's mean
  token) where it has none (SigLIP: OneVision, Idefics3/SmolVLM): no thumbnail
  guidance (Eq. 5 with local scores only) and no adaptive allocation (Eq. 2-4 replaced by r_j = R). The selection
  is :func:`~globalcom2.core.select.select_images`; the counts are GlobalCom²'s budget counts
  (:func:`~globalcom2.core.budget.budget_counts`).
- **random** (:class:`RandomScores` on any family, :func:`random_class`): the same selection and counts on scores
  drawn uniformly at random instead of the tiles' own scores. The draw of an image comes from a generator made for that image from ``seed`` alone, so
  the same seed keeps the same tokens for the same geometry in any batch, thread or call order.
- **pooling** (:class:`PoolingAdapter`): each tile's valid block of h x w cells is averaged down to a x b cells
  with a = max(1, floor(h*sqrt(R) + 1/2)), b likewise; cell (y, x) goes to bin (y*a // h, x*b // w) (a partition,
  bins differ by at most one cell per side). Nothing is discarded, so the plan's masks mark every valid cell as
  kept and :class:`PoolingPlan` records which pooled token covers each cell. Count (its own, replacing
  ``count_tokens``): a0*a0 (thumbnail) + (sum_r a_r) * (sum_c b_c) (crop grid) + sum_r a_r (one newline per pooled
  row), close to but not always equal to the budget count (R = 10 %, g = 24: 8*8 = 64 thumbnail tokens vs
  int(57.6) = 57). Under ``max_image_tokens=T`` an image's R is the largest whose pooling count fits T
  (:func:`~globalcom2.core.budget.largest_fitting_ratio` on this count, which never falls as R grows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.anyres import AnyresGeometry
from ..adapters.base import GlobalComHandle
from ..adapters.llava_next import LlavaNextAdapter
from ..core.budget import largest_fitting_ratio
from ..core.layout import grid_to_tiles
from ..core.plan import Plan

#: The steps FasterVLM swaps in GlobalCom²'s config: uniform r_j = R, local scores only, softmax [CLS] scores.
FASTERVLM: dict[str, Any] = {"allocation": "uniform", "scoring": "local", "score": "softmax"}
#: The random baseline's config: uniform r_j = R and local (here: random) scores.
RANDOM: dict[str, Any] = {"allocation": "uniform", "scoring": "local"}


def image_sizes_list(image_sizes: Any) -> list[tuple[int, int]]:
    """``image_sizes`` (tensor or nested list) as ``[(height, width), ...]``."""
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
    return [(int(h), int(w)) for h, w in sizes]


# -------------------------------------------------------------------------------------------- random


def random_tile_scores(shape: torch.Size | tuple[int, ...], seed: int, device: Any = None) -> torch.Tensor:
    """Uniform random scores of one image's tiles, from a generator made for this draw from ``seed``.

    No generator state is shared between draws, so concurrent forwards cannot disturb each other and the result
    depends on ``seed`` and ``shape`` only (drawn on the CPU, so on every device alike).
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=generator).to(device)


class RandomScores:
    """The random baseline on any family: GlobalCom²'s budget-mode selection at uniform R on random scores.

    A mixin put in front of a family adapter (:func:`random_class`): every family's planner takes the tiles' scores
    first (``(tiles, tokens)`` per image), and this swaps them for :func:`random_tile_scores` of the same shape. The
    native-resolution planner (Qwen) takes the merged tokens' features and scores them by Eq. 7: there the swap gives
    it i.i.d. random features, whose scores are exchangeable, so the kept tokens are a uniformly random draw (the
    features handed to the LLM are the real ones, picked by the plan's index).
    """

    seed: int

    def __init__(self, model: Any, processor: Any, config: Any, *, seed: int = 0) -> None:
        super().__init__(model, processor, config)  # type: ignore[call-arg]
        self.seed = int(seed)

    def plan_images(self, tile_scores: Sequence[torch.Tensor], *args: Any) -> list[tuple[Plan, torch.Tensor]]:
        """The one swapped step: each image's tile scores become random (same shape, same device)."""
        scores = [random_tile_scores(t.shape, self.seed, t.device) for t in tile_scores]
        return super().plan_images(scores, *args)  # type: ignore[misc]


@functools.cache
def random_class(family: type) -> type:
    """The random baseline's adapter class on ``family`` (one class per family, made once)."""
    return type(f"Random{family.__name__}", (RandomScores, family), {})


#: The random baseline on LLaVA-NeXT.
RandomAdapter = random_class(LlavaNextAdapter)


# -------------------------------------------------------------------------------------------- pooling


@dataclass
class PoolingPlan(Plan):
    """`Plan` of the pooling baseline: nothing is discarded, tokens are averaged.

    ``thumbnail_mask`` / ``crops_mask`` are True on every valid cell (each contributes to one pooled token);
    ``crop_keep_counts`` are pooled tokens per crop and ``crop_ratios`` pooled / valid tokens.

    Attributes:
        thumbnail_cover: Long ``(g, g)``: index of the pooled thumbnail token each cell is averaged into.
        crops_cover: Long ``(rows*g, cols*g)``: index (raster order over the pooled crop grid, newlines not
            counted) of the pooled crop token each cell is averaged into; -1 on padding.
        pooled_shape: ``(sum_r a_r, sum_c b_c)``: the pooled crop grid.
    """

    thumbnail_cover: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    crops_cover: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    pooled_shape: tuple[int, int] = (0, 0)


def pooled_side(num_cells: int, ratio: float) -> int:
    """Pooled length of a side of ``num_cells`` cells: max(1, floor(num_cells * sqrt(R) + 1/2)); 0 stays 0."""
    if num_cells <= 0:
        return 0
    return max(1, math.floor(num_cells * math.sqrt(ratio) + 0.5))


def _bins(num_cells: int, num_bins: int) -> torch.Tensor:
    return (torch.arange(num_cells) * num_bins) // max(num_cells, 1)


def _axis(num_tiles: int, g: int, lo: int, hi: int, ratio: float) -> tuple[torch.Tensor, list[int]]:
    """Pooled index along one axis of the padded crop grid (-1 outside ``[lo, hi)``) and pooled length per tile."""
    index = torch.full((num_tiles * g,), -1, dtype=torch.long)
    sides, offset = [], 0
    for t in range(num_tiles):  # one step per tile row/column, not per token
        start, stop = max(t * g, lo), min((t + 1) * g, hi)
        side = pooled_side(stop - start, ratio)
        if side:
            index[start:stop] = offset + _bins(stop - start, side)
        sides.append(side)
        offset += side
    return index, sides


def pooling_counts(geo: AnyresGeometry, ratio: float, newline: bool = True) -> int:
    """Image tokens handed to the LLM by the pooling baseline (formula in the module docstring)."""
    rows, cols = geo.grid
    top, bottom, left, right = geo.box
    a = sum(_axis(rows, geo.g, top, bottom, ratio)[1])
    b = sum(_axis(cols, geo.g, left, right, ratio)[1])
    a0 = pooled_side(geo.g, ratio)
    return a0 * a0 + a * b + (a if newline else 0)


def plan_pooling(geo: AnyresGeometry, ratio: float, newline: bool = True) -> PoolingPlan:
    """Pooling geometry of one tiled image: which pooled token covers each thumbnail and crop-grid cell."""
    rows, cols = geo.grid
    g = geo.g
    a0 = pooled_side(g, ratio)
    tb = _bins(g, a0)
    top, bottom, left, right = geo.box
    row_index, a = _axis(rows, g, top, bottom, ratio)
    col_index, b = _axis(cols, g, left, right, ratio)
    width = sum(b)
    crops_cover = torch.where(
        (row_index[:, None] >= 0) & (col_index[None, :] >= 0),
        row_index[:, None] * width + col_index[None, :],
        torch.full((rows * g, cols * g), -1, dtype=torch.long),
    )
    valid = crops_cover >= 0
    per_crop = torch.tensor([ar * bc for ar in a for bc in b], dtype=torch.long)
    valid_counts = grid_to_tiles(valid, rows, cols).reshape(rows * cols, -1).sum(-1)
    return PoolingPlan(
        grid=geo.grid,
        thumbnail_mask=torch.ones(g, g, dtype=torch.bool),
        crops_mask=valid,
        crop_ratios=per_crop.float() / valid_counts.clamp_min(1).float(),
        num_tokens=pooling_counts(geo, ratio, newline),
        num_tokens_full=geo.num_tokens(None, newline),
        valid_box=geo.box,
        crop_keep_counts=per_crop,
        crop_valid_counts=valid_counts,
        mode="pooling",
        thumbnail_order=None,
        ratio=ratio,
        thumbnail_cover=tb[:, None] * a0 + tb[None, :],
        crops_cover=crops_cover,
        pooled_shape=(sum(a), width),
    )


def _segment_mean(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of the rows of ``values`` ``(M, D)`` per segment id in ``index`` ``(M,)``."""
    out = values.new_zeros(num_segments, values.shape[-1], dtype=torch.float32)
    out.index_add_(0, index, values.float())
    count = torch.zeros(num_segments, device=values.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float32)
    )
    return (out / count.clamp_min(1.0)[:, None]).to(values.dtype)


def pool_packed(seq: torch.Tensor, plan: PoolingPlan, newline: bool) -> torch.Tensor:
    """The pooled token sequence of one image from HF's packed one.

    Args:
        seq: ``(g*g + H*(W + newline), D)``: HF's ``pack_image_features`` output of the image (thumbnail, then the
            valid crop grid row by row, each row followed by ``image_newline`` if ``newline``).
        plan: its :func:`plan_pooling` plan.
        newline: whether ``seq`` carries the newlines; the pooled rows then end with the same newline token.

    Returns:
        ``(plan.num_tokens, D)``.
    """
    g = plan.patches_per_side
    dev, d = seq.device, seq.shape[-1]
    top, bottom, left, right = plan.valid_box
    height, width = bottom - top, right - left
    num_thumb = int(plan.thumbnail_cover.max()) + 1
    thumb = _segment_mean(seq[: g * g], plan.thumbnail_cover.reshape(-1).to(dev), num_thumb)
    rows = seq[g * g :].reshape(height, width + int(newline), d)
    cover = plan.crops_cover[top:bottom, left:right].reshape(-1).to(dev)
    h, w = plan.pooled_shape
    crops = _segment_mean(rows[:, :width].reshape(-1, d), cover, h * w).reshape(h, w, d)
    if newline:
        crops = torch.cat([crops, rows[:1, width:].expand(h, 1, d)], dim=1)
    return torch.cat([thumb, crops.reshape(-1, d)])


class PoolingAdapter(LlavaNextAdapter):
    """Spatial average pooling of every tile to about R of its tokens (see the module docstring).

    Overrides what pooling changes: no scoring hook (nothing is ranked), its own count and the rows handed to
    the LLM (pooled means of HF's packed rows instead of a selection of them).
    """

    def install_scoring(self, handle: GlobalComHandle) -> None:
        """Pooling ranks nothing: no scoring hook."""

    def count_tokens(self, geo: AnyresGeometry, newline: bool = True) -> int:
        return pooling_counts(geo, self.image_ratio(geo, newline), newline)

    def image_ratio(self, geo: AnyresGeometry, newline: bool = True) -> float:
        """R of one image: ``ratio``, or the largest R whose *pooling* count fits ``max_image_tokens``."""
        limit = self.config.max_image_tokens
        if limit is None:
            return geo.image_ratio(self.config, newline)  # the configured R
        return largest_fitting_ratio(lambda r: pooling_counts(geo, r, newline), limit)

    def select_packed(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                      arguments: dict[str, Any]) -> tuple[list[Plan], list[torch.Tensor]]:  # fmt: skip
        newline = arguments.get("image_newline") is not None
        options = self.geometry_options(arguments)
        plans: list[Plan] = []
        out = []
        sizes = image_sizes_list(arguments["image_sizes"])
        for feats, seq, (h, w) in zip(arguments["image_features"], packed, sizes, strict=True):
            if int(feats.shape[0]) == 1:  # a single tile is not compressed (as in GlobalCom²)
                plan, index = self.plan_single_tile(newline, seq.device)
                _check_packed(seq, plan, (h, w))
                out.append(seq[index])
            else:
                geo = self.geometry((h, w), **options)
                pooling = plan_pooling(geo, self.image_ratio(geo, newline), newline)
                _check_packed(seq, pooling, (h, w))
                out.append(pool_packed(seq, pooling, newline))
                plan = pooling
            plans.append(plan)
        return plans, out


def _check_packed(seq: torch.Tensor, plan: Plan, size: tuple[int, int]) -> None:
    if seq.shape[0] != plan.num_tokens_full:
        raise RuntimeError(
            f"pooling: HF packed {seq.shape[0]} tokens for an image of {size[0]}x{size[1]}, the geometry gives "
            f"{plan.num_tokens_full}; this transformers version packs differently"
        )
