"""Pre-LLM baselines on the LLaVA-NeXT adapter: FasterVLM-style [CLS] top-k, random, spatial average pooling.

Each is the GlobalCom² pipeline with one step swapped (DESIGN.md §1: "a baseline is usually a different score or a
different allocation"), so it shares budget-mode counting with GlobalCom²: the processor emits exactly as many
placeholders as features are produced.

- **FasterVLM-style**: every tile keeps its top tokens by its *own* [CLS] attention (paper Eq. 1, softmax
  probabilities as in FasterVLM) at the uniform ratio R: no thumbnail guidance (Eq. 5 with local scores only) and
  no adaptive allocation (Eq. 2-4 replaced by r_j = R). Same counts as GlobalCom² in budget mode.
- **random**: the same counts, tokens drawn uniformly at random inside each tile.
- **pooling**: each tile's valid block of h x w cells is averaged down to a x b cells with
  a = max(1, floor(h*sqrt(R) + 1/2)), b likewise; cell (y, x) goes to bin (y*a // h, x*b // w) (a partition,
  bins differ by at most one cell per side). Nothing is discarded, so the plan's masks mark every valid cell as
  kept and :class:`PoolingPlan` records which pooled token covers each cell. Count:
  a0*a0 (thumbnail) + (sum_r a_r) * (sum_c b_c) (crop grid) + sum_r a_r (one newline per pooled row), close to
  but not always equal to the budget count (R = 10 %, g = 24: 8*8 = 64 thumbnail tokens vs int(57.6) = 57).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapters.llava_next import LlavaNextAdapter, image_grid
from ..core.budget import full_num_tokens
from ..core.geometry import grid_to_tiles, valid_box
from ..core.plan import Plan
from ..core.planner import plan_image, plan_single_tile

# -------------------------------------------------------------------------------------------- pure planners


def plan_fastervlm(
    thumb_scores: torch.Tensor,
    crop_scores: torch.Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    ratio: float,
    mode: str = "budget",
) -> tuple[Plan, torch.Tensor]:
    """FasterVLM-style plan: per-tile top-k by the tile's own [CLS] scores at the uniform ratio R.

    Args:
        thumb_scores: ``(g*g,)`` thumbnail [CLS] scores.
        crop_scores: ``(rows*cols, g*g)`` each crop's own [CLS] scores.
        grid, image_size, ratio, mode: as :func:`globalcom2.core.planner.plan_image`.
    """
    return plan_image(
        thumb_scores, crop_scores, grid=grid, image_size=image_size, ratio=ratio, mode=mode,
        allocation="uniform", scoring="local",
    )  # fmt: skip


def plan_random(
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    g: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Plan, torch.Tensor]:
    """Random plan with the budget-mode counts of GlobalCom² at uniform r_j = R (tokens drawn per tile)."""
    rows, cols = grid
    scores = torch.rand(1 + rows * cols, g * g, generator=generator).to(device)
    plan, index = plan_image(
        scores[0], scores[1:], grid=grid, image_size=image_size, ratio=ratio, mode="budget",
        allocation="uniform", scoring="local",
    )  # fmt: skip
    return plan, index


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


def pooling_counts(height: int, width: int, rows: int, cols: int, g: int, ratio: float) -> int:
    """Image tokens handed to the LLM by the pooling baseline (formula in the module docstring)."""
    top, bottom, left, right = valid_box(height, width, rows * g, cols * g)
    a = sum(pooled_side(min((r + 1) * g, bottom) - max(r * g, top), ratio) for r in range(rows))
    b = sum(pooled_side(min((c + 1) * g, right) - max(c * g, left), ratio) for c in range(cols))
    a0 = pooled_side(g, ratio)
    return a0 * a0 + a * b + a


def plan_pooling(*, grid: tuple[int, int], image_size: tuple[int, int], g: int, ratio: float) -> PoolingPlan:
    """Pooling geometry of one image: which pooled token covers each thumbnail and crop-grid cell."""
    rows, cols = grid
    a0 = pooled_side(g, ratio)
    tb = _bins(g, a0)
    thumbnail_cover = tb[:, None] * a0 + tb[None, :]
    top, bottom, left, right = box = valid_box(image_size[0], image_size[1], rows * g, cols * g)

    def axis(n_tiles: int, lo: int, hi: int) -> tuple[torch.Tensor, list[int]]:
        # pooled index along one axis of the padded grid (-1 on padding) and pooled length per tile
        index = torch.full((n_tiles * g,), -1, dtype=torch.long)
        sides, offset = [], 0
        for t in range(n_tiles):  # one step per tile row/column, not per token
            start, stop = max(t * g, lo), min((t + 1) * g, hi)
            side = pooled_side(stop - start, ratio)
            if side:
                index[start:stop] = offset + _bins(stop - start, side)
            sides.append(side)
            offset += side
        return index, sides

    row_index, a = axis(rows, top, bottom)
    col_index, b = axis(cols, left, right)
    width = sum(b)
    crops_cover = torch.where(
        (row_index[:, None] >= 0) & (col_index[None, :] >= 0),
        row_index[:, None] * width + col_index[None, :],
        torch.full((rows * g, cols * g), -1, dtype=torch.long),
    )
    valid = crops_cover >= 0
    per_crop = torch.tensor([ar * bc for ar in a for bc in b], dtype=torch.long)
    valid_counts = grid_to_tiles(valid, rows, cols).reshape(rows * cols, -1).sum(-1)
    height, width_px = image_size
    return PoolingPlan(
        grid=(rows, cols),
        thumbnail_mask=torch.ones(g, g, dtype=torch.bool),
        crops_mask=valid,
        crop_ratios=per_crop.float() / valid_counts.clamp_min(1).float(),
        num_tokens=pooling_counts(height, width_px, rows, cols, g, ratio),
        num_tokens_full=full_num_tokens(height, width_px, rows, cols, g),
        valid_box=box,
        crop_keep_counts=per_crop,
        crop_valid_counts=valid_counts,
        mode="pooling",
        thumbnail_order=None,
        thumbnail_cover=thumbnail_cover,
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


def pool_features(features: torch.Tensor, plan: PoolingPlan, newline: torch.Tensor | None) -> torch.Tensor:
    """The pooled token sequence of one image.

    Args:
        features: ``(1 + rows*cols, g*g, D)`` projected tile features, thumbnail first.
        plan: its :func:`plan_pooling` plan.
        newline: ``(D,)`` ``image_newline`` embedding, appended after every pooled crop row (None: no newlines).

    Returns:
        ``(plan.num_tokens, D)`` (without newlines if ``newline`` is None).
    """
    rows, cols = plan.grid
    g = plan.patches_per_side
    dev = features.device
    num_thumb = int(plan.thumbnail_cover.max()) + 1
    thumb = _segment_mean(features[0], plan.thumbnail_cover.reshape(-1).to(dev), num_thumb)
    d = features.shape[-1]
    canvas = features[1:].reshape(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(-1, d)
    cover = plan.crops_cover.reshape(-1).to(dev)
    sel = cover >= 0
    h, w = plan.pooled_shape
    crops = _segment_mean(canvas[sel], cover[sel], h * w).reshape(h, w, d)
    if newline is not None:
        crops = torch.cat([crops, newline.to(crops)[None, None].expand(h, 1, d)], dim=1)
    return torch.cat([thumb, crops.reshape(-1, d)])


# -------------------------------------------------------------------------------------------- adapters


class FasterVLMAdapter(LlavaNextAdapter):
    """FasterVLM-style selection (see the module docstring) on LLaVA-NeXT; config fixed to uniform/local."""

    def plan_tiles(self, tile_scores: torch.Tensor, image_size: tuple[int, int]) -> tuple[Plan, torch.Tensor]:
        if tile_scores.shape[0] == 1:
            return plan_single_tile(self.g, device=tile_scores.device)
        return plan_fastervlm(
            tile_scores[0], tile_scores[1:], grid=image_grid(image_size, self.pinpoints, self.tile),
            image_size=image_size, ratio=self.config.ratio, mode=self.config.mode,
        )  # fmt: skip


class RandomAdapter(LlavaNextAdapter):
    """Random tokens per tile with GlobalCom²'s budget counts; ``seed`` seeds a generator drawn on every forward."""

    seed: int = 0

    def install(self, handle) -> None:
        self.generator = torch.Generator().manual_seed(int(self.seed))
        super().install(handle)

    def plan_tiles(self, tile_scores: torch.Tensor, image_size: tuple[int, int]) -> tuple[Plan, torch.Tensor]:
        if tile_scores.shape[0] == 1:
            return plan_single_tile(self.g, device=tile_scores.device)
        return plan_random(
            grid=image_grid(image_size, self.pinpoints, self.tile), image_size=image_size, g=self.g,
            ratio=self.config.ratio, generator=self.generator, device=tile_scores.device,
        )  # fmt: skip


class PoolingAdapter(LlavaNextAdapter):
    """Spatial average pooling of every tile to about R of its tokens (see the module docstring)."""

    def count_tokens(self, height: int, width: int, rows: int, cols: int, g: int) -> int:
        return pooling_counts(height, width, rows, cols, g, self.config.ratio)

    def _pack(
        self, handle, image_features, image_sizes, vision_feature_select_strategy=None, image_newline=None
    ):
        handle._pending_scores.clear()  # pooling needs no scores
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        )
        plans, packed = [], []
        for feats, (h, w) in zip(image_features, sizes, strict=True):
            if feats.shape[0] == 1:
                plan, index = plan_single_tile(self.g, device=feats.device)
                flat = feats.flatten(0, 1)
                if image_newline is not None:
                    flat = torch.cat([flat, image_newline[None].to(flat)])
                packed.append(flat[index[index < flat.shape[0]]])
            else:
                grid = image_grid((int(h), int(w)), self.pinpoints, self.tile)
                plan = plan_pooling(grid=grid, image_size=(int(h), int(w)), g=self.g, ratio=self.config.ratio)
                packed.append(pool_features(feats, plan, image_newline))
            plans.append(plan)
        handle.plans = plans
        lens = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lens
