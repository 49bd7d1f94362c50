"""Pre-LLM baselines on every family: FasterVLM-style top-k, random and spatial average pooling.

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
- **pooling** (one mixin per token layout, on every family: :func:`globalcom2.methods.pooling.pooling_class`). A
  side of n cells is pooled to a = max(1, floor(n*sqrt(R) + 1/2)) cells (:func:`pooled_side`), cell k going to bin
  k*a // n (a partition, bins differ by at most one cell). Nothing is discarded: the plan's masks mark every valid cell as kept and
  :class:`PoolingPlan` records which pooled token covers each cell. Per layout:

  - *anyres* (LLaVA-NeXT, LLaVA-OneVision; :class:`AnyresPooling`): the thumbnail's g x g grid to a0 x a0; the crop
    token grid the LLM receives (the unpadded valid box; on OneVision the possibly down-sampled grid, each token row
    and column belonging to the crop of its anchor patch, :func:`~globalcom2.adapters.anyres.resample_blocks`) cut
    into per-crop blocks of h_r x w_c tokens, each averaged to a_r x b_c; the pooled crop grid keeps HF's packing
    (raster order, one ``image_newline`` per pooled row). Count: a0*a0 + (sum_r a_r) * (sum_c b_c) + sum_r a_r.
  - *InternVL's tiles* (InternVL, Idefics3, SmolVLM, Gemma 3, Aya Vision; :class:`TilePooling`): every tile -- each
    crop and the thumbnail, or the lone tile of a one-tile image -- is a full g x g grid of LLM tokens (after the
    pixel shuffle; Gemma 3: the projector's 16 x 16 pooled grid) averaged to a x a, tile after tile in the family's
    order (raster inside each). Count: tiles * a*a, every run a*a where each tile has its own run.
  - *native grids* (Qwen-VL): :mod:`globalcom2.methods.native`.

  The count is close to but not always equal to the budget count (R = 10 %, g = 24: 8*8 = 64 thumbnail tokens vs
  int(57.6) = 57). Under ``max_image_tokens=T`` an image's R is the largest whose pooling count (plus the family's
  layout tokens) fits T (:func:`~globalcom2.core.budget.largest_fitting_ratio` on this count, which never falls as R
  grows).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.anyres import AnyresGeometry, resample_blocks
from ..adapters.base import GlobalComHandle
from ..adapters.llava_next import LlavaNextAdapter
from ..core.budget import largest_fitting_ratio
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
        token_cover: Long ``(H, W)``: the same index for every crop token the LLM receives (anyres families:
            the unpadded, possibly down-sampled, token grid; ``crops_cover`` inside the valid box when not
            down-sampled); None for families whose tiles are pooled whole (InternVL's layout).
        tile_tokens: pooled tokens of every tile in the family's tile order (InternVL's layout: one run per tile
            on the families that frame each tile's run); empty for the anyres families.
    """

    thumbnail_cover: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    crops_cover: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    pooled_shape: tuple[int, int] = (0, 0)
    token_cover: torch.Tensor | None = None
    tile_tokens: tuple[int, ...] = ()


def pooled_side(num_cells: int, ratio: float) -> int:
    """Pooled length of a side of ``num_cells`` cells: max(1, floor(num_cells * sqrt(R) + 1/2)); 0 stays 0."""
    if num_cells <= 0:
        return 0
    return max(1, math.floor(num_cells * math.sqrt(ratio) + 0.5))


def _bins(num_cells: int, num_bins: int) -> torch.Tensor:
    return (torch.arange(num_cells) * num_bins) // max(num_cells, 1)


def _axis(blocks: torch.Tensor, num_tiles: int, ratio: float) -> tuple[torch.Tensor, list[int], list[int]]:
    """Pooling along one axis of a crop token grid whose rows (or columns) belong to the tiles ``blocks``.

    Args:
        blocks: Long ``(H,)``: the tile row (column) of every token row (column), non-decreasing.
        num_tiles: tile rows (columns) of the crop grid.

    Returns:
        ``(index, sides, lengths)``: Long ``(H,)`` pooled row of every token row (bins within each tile, tiles
        after each other), the pooled length a_r of each tile row and its token rows h_r.
    """
    lengths = torch.bincount(blocks, minlength=num_tiles)[:num_tiles]
    sizes = [int(n) for n in lengths.tolist()]  # host arithmetic on the geometry (no device tensor)
    sides = [pooled_side(n, ratio) for n in sizes]
    first = torch.tensor([0, *itertools.accumulate(sizes)][:num_tiles], dtype=torch.long)
    offset = torch.tensor([0, *itertools.accumulate(sides)][:num_tiles], dtype=torch.long)
    side = torch.tensor(sides, dtype=torch.long)
    within = torch.arange(blocks.numel()) - first[blocks]
    index = offset[blocks] + within * side[blocks] // lengths[blocks].clamp_min(1)
    return index, sides, sizes


def _anyres_axes(geo: AnyresGeometry, ratio: float) -> tuple[tuple, tuple]:
    """Both axes of an anyres crop token grid (:func:`_axis`); token rows belong to the crop of their anchor patch
    (:func:`~globalcom2.adapters.anyres.resample_blocks`: their own patch when the grid is not down-sampled)."""
    row_block, col_block = resample_blocks(geo.box, geo.token_grid, geo.g)
    rows, cols = geo.grid
    return _axis(row_block, rows, ratio), _axis(col_block, cols, ratio)


def pooling_counts(geo: AnyresGeometry, ratio: float, newline: bool = True) -> int:
    """Image tokens handed to the LLM by the pooling baseline on an anyres image (module docstring)."""
    (_, a, _), (_, b, _) = _anyres_axes(geo, ratio)
    a0 = pooled_side(geo.g, ratio)
    return a0 * a0 + sum(a) * sum(b) + (sum(a) if newline else 0)


def plan_pooling(geo: AnyresGeometry, ratio: float, newline: bool = True) -> PoolingPlan:
    """Pooling geometry of one anyres image: which pooled token covers each thumbnail cell and crop token."""
    rows, cols = geo.grid
    g = geo.g
    a0 = pooled_side(g, ratio)
    tb = _bins(g, a0)
    (row_index, a, heights), (col_index, b, widths) = _anyres_axes(geo, ratio)
    width = sum(b)
    token_cover = row_index[:, None] * width + col_index[None, :]  # (H, W)
    top, bottom, left, right = geo.box
    crops_cover = torch.full((rows * g, cols * g), -1, dtype=torch.long)
    h, w = bottom - top, right - left
    if h > 0 and w > 0 and token_cover.numel():  # each patch takes the token over it (footprint's rule)
        ri = torch.arange(h) * token_cover.shape[0] // h
        ci = torch.arange(w) * token_cover.shape[1] // w
        crops_cover[top:bottom, left:right] = token_cover[ri][:, ci]
    per_crop = torch.tensor([ar * bc for ar in a for bc in b], dtype=torch.long)
    valid_counts = torch.tensor([hr * wc for hr in heights for wc in widths], dtype=torch.long)
    return PoolingPlan(
        grid=geo.grid,
        thumbnail_mask=torch.ones(g, g, dtype=torch.bool),
        crops_mask=crops_cover >= 0,
        crop_ratios=per_crop.float() / valid_counts.clamp_min(1).float(),
        num_tokens=a0 * a0 + sum(a) * width + (sum(a) if newline else 0),
        num_tokens_full=geo.num_tokens(None, newline),
        valid_box=geo.box,
        crop_keep_counts=per_crop,
        crop_valid_counts=valid_counts,
        mode="pooling",
        thumbnail_order=None,
        token_mask=torch.ones(geo.token_grid, dtype=torch.bool) if geo.resampled else None,
        token_grid=geo.token_grid if geo.resampled else None,
        ratio=ratio,
        thumbnail_cover=tb[:, None] * a0 + tb[None, :],
        crops_cover=crops_cover,
        pooled_shape=(sum(a), width),
        token_cover=token_cover,
    )


def tile_pooling_bins(g: int, ratio: float) -> tuple[int, torch.Tensor]:
    """``(a, bins)``: a tile's ``g x g`` token grid pooled to ``a x a`` (a = :func:`pooled_side`), Long ``(g*g,)``
    pooled token (raster order of the ``a x a`` grid) of every token in raster order."""
    a = pooled_side(g, ratio)
    bins = _bins(g, a)
    return a, (bins[:, None] * a + bins[None, :]).reshape(-1)


def plan_tile_pooling(grid: tuple[int, int], g: int, ratio: float) -> tuple[PoolingPlan, torch.Tensor]:
    """Pooling of one image of InternVL's layout: every tile (crops row-major and the thumbnail) is a full
    ``g x g`` grid of LLM tokens (after the pixel shuffle or the projector's pooling), pooled whole to ``a x a``.

    Args:
        grid: ``(rows, cols)`` of crops; ``(1, 1)``: one tile, the whole image (its own global view).
        g: LLM tokens per tile side.
        ratio: the image's R.

    Returns:
        ``(plan, bins)``: Long ``(tiles*g*g,)``: the pooled token (in the LLM's order: tile after tile, raster
        order inside each) that each of the image's tokens, in the family's tile order, is averaged into. Every
        tile pools alike, so the thumbnail's place (last on InternVL, Idefics3, Aya Vision; first on Gemma 3)
        changes nothing here.
    """
    rows, cols = grid if grid[0] * grid[1] > 1 else (0, 0)  # a lone tile: no crops
    n = rows * cols
    tiles = n + 1
    a, tb = tile_pooling_bins(g, ratio)
    bins = (torch.arange(tiles)[:, None] * (a * a) + tb[None, :]).reshape(-1)
    # the crop grid's cover: cell (r*g + y, c*g + x) -> pooled crop token (r*a + y*a//g, c*a + x*a//g), raster
    cell = _bins(g, a)
    row_index = (torch.arange(rows * g) // g) * a + cell.repeat(rows)
    col_index = (torch.arange(cols * g) // g) * a + cell.repeat(cols)
    crops_cover = row_index[:, None] * (cols * a) + col_index[None, :]
    plan = PoolingPlan(
        grid=(rows, cols),
        thumbnail_mask=torch.ones(g, g, dtype=torch.bool),
        crops_mask=torch.ones(crops_cover.shape, dtype=torch.bool),
        crop_ratios=torch.full((n,), a * a / (g * g)),
        num_tokens=tiles * a * a,
        num_tokens_full=tiles * g * g,
        valid_box=(0, rows * g, 0, cols * g),
        crop_keep_counts=torch.full((n,), a * a, dtype=torch.long),
        crop_valid_counts=torch.full((n,), g * g, dtype=torch.long),
        mode="pooling",
        thumbnail_order=None,
        ratio=ratio,
        thumbnail_cover=tb.reshape(g, g),
        crops_cover=crops_cover,
        pooled_shape=(rows * a, cols * a),
        tile_tokens=(a * a,) * tiles,
    )
    return plan, bins


def segment_mean(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of the rows of ``values`` ``(M, D)`` per segment id in ``index`` ``(M,)``, in float32 (the input's
    dtype returned)."""
    out = values.new_zeros(num_segments, values.shape[-1], dtype=torch.float32)
    out.index_add_(0, index, values.float())
    count = torch.zeros(num_segments, device=values.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float32)
    )
    return (out / count.clamp_min(1.0)[:, None]).to(values.dtype)


def pool_packed(seq: torch.Tensor, plan: PoolingPlan, newline: bool) -> torch.Tensor:
    """The pooled token sequence of one anyres image from HF's packed one.

    Args:
        seq: ``(g*g + H*(W + newline), D)``: HF's ``pack_image_features`` output of the image (thumbnail, then the
            crop token grid row by row, each row followed by ``image_newline`` if ``newline``).
        plan: its :func:`plan_pooling` plan.
        newline: whether ``seq`` carries the newlines; the pooled rows then end with the same newline token.

    Returns:
        ``(plan.num_tokens, D)``.
    """
    g = plan.patches_per_side
    dev, d = seq.device, seq.shape[-1]
    assert plan.token_cover is not None  # an anyres plan
    height, width = plan.token_cover.shape
    num_thumb = int(plan.thumbnail_cover.max()) + 1
    thumb = segment_mean(seq[: g * g], plan.thumbnail_cover.reshape(-1).to(dev), num_thumb)
    rows = seq[g * g :].reshape(height, width + int(newline), d)
    h, w = plan.pooled_shape
    crops = segment_mean(rows[:, :width].reshape(-1, d), plan.token_cover.reshape(-1).to(dev), h * w)
    crops = crops.reshape(h, w, d)
    if newline:
        crops = torch.cat([crops, rows[:1, width:].expand(h, 1, d)], dim=1)
    return torch.cat([thumb, crops.reshape(-1, d)])


class AnyresPooling:
    """The pooling baseline in front of an anyres family adapter (LLaVA-NeXT, LLaVA-OneVision).

    Overrides what pooling changes: no scoring hook (nothing is ranked), its own count and the rows handed to
    the LLM (pooled means of HF's packed rows instead of a selection of them).
    """

    config: Any

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
        options = self.geometry_options(arguments)  # type: ignore[attr-defined]
        plans: list[Plan] = []
        out = []
        sizes = image_sizes_list(arguments["image_sizes"])
        for feats, seq, (h, w) in zip(arguments["image_features"], packed, sizes, strict=True):
            if int(feats.shape[0]) == 1:  # a single tile is not compressed (as in GlobalCom²)
                plan, index = self.plan_single_tile(newline, seq.device)  # type: ignore[attr-defined]
                _check_packed(seq, plan, (h, w))
                out.append(seq[index])
            else:
                geo = self.geometry((h, w), **options)  # type: ignore[attr-defined]
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


class TilePooling:
    """The pooling baseline in front of a family adapter of InternVL's layout (InternVL, Idefics3, SmolVLM, Gemma 3,
    Aya Vision): every tile's ``g x g`` LLM tokens averaged to ``a x a``
    (:func:`plan_tile_pooling`).

    Swaps the family's planner (no scores: the scoring hooks are not installed), the gather of the kept tokens
    (a segment mean instead), the budget counts (``tiles * a*a`` per image, every run ``a*a``) and the R under
    ``max_image_tokens`` (the largest whose pooling count, the family's layout tokens included, fits T).
    """

    config: Any
    g: int

    def install_scoring(self, handle: GlobalComHandle) -> None:
        """Pooling ranks nothing: no scoring hook."""

    def take_scores(self, handle: GlobalComHandle) -> None:
        """No scores are recorded (nothing is ranked)."""
        return None

    def _pooled_count(self, grid: tuple[int, int], ratio: float) -> int:
        tiles = grid[0] * grid[1] + 1 if grid[0] * grid[1] > 1 else 1
        return tiles * pooled_side(self.g, ratio) ** 2

    def ratio_for_grid(self, grid: tuple[int, int]) -> float:
        """R of one image of this crop grid: ``ratio``, or the largest R whose pooling count plus the family's
        layout tokens fits ``max_image_tokens``."""
        limit = self.config.max_image_tokens
        if limit is None:
            return float(self.config.ratio)
        layout = self.layout_tokens(grid)  # type: ignore[attr-defined]
        return largest_fitting_ratio(lambda r: layout + self._pooled_count(grid, r), limit)

    def num_image_tokens_for_grid(self, grid: tuple[int, int]) -> int:
        """Placeholders of one image of this crop grid (the layout tokens not included)."""
        return self._pooled_count(grid, self.ratio_for_grid(grid))

    def emitted_runs(self, grid: tuple[int, int]) -> list[int]:
        """Placeholders per run (families that frame every tile's run): ``a*a`` each, known before the forward."""
        tiles = grid[0] * grid[1] + 1 if grid[0] * grid[1] > 1 else 1
        return [pooled_side(self.g, self.ratio_for_grid(grid)) ** 2] * tiles

    def placeholder_run_counts(self, plans: list[Any]) -> list[int]:
        """Every run's length: one run per image (InternVL), or ``a*a`` per tile where each tile has its run."""
        if not hasattr(super(), "in_run_order"):
            return [p.num_tokens for p in plans]
        return [t for p in plans for t in p.tile_tokens]

    def plan_images(
        self, tile_scores: Sequence[Any], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[Plan, torch.Tensor]]:
        """One :func:`plan_tile_pooling` per image (the scores are not used); the index is every token's bin."""
        return [plan_tile_pooling(grid, self.g, self.ratio_for_grid(grid)) for grid in grids]

    def take_planned(
        self, flat: torch.Tensor, planned: list[tuple[Plan, torch.Tensor]], counts: list[int]
    ) -> torch.Tensor:
        """The pooled tokens of every image, in order: one segment mean over the whole batch's tokens."""
        offsets = itertools.accumulate([p.num_tokens for p, _ in planned[:-1]], initial=0)
        bins = torch.cat([b + o for (_, b), o in zip(planned, offsets, strict=True)]).to(flat.device)
        return segment_mean(flat, bins, sum(p.num_tokens for p, _ in planned))


#: The pooling baseline on LLaVA-NeXT (:func:`globalcom2.methods.pooling.pooling_class` gives it for LLaVA-NeXT).
PoolingAdapter = type("PoolingLlavaNextAdapter", (AnyresPooling, LlavaNextAdapter), {})
