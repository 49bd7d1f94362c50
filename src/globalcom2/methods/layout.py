"""Where every image token of an uncompressed LLaVA-NeXT image sits in the LLM sequence, and back to a `Plan`.

Methods that prune inside the LLM (FastV, GlobalCom² + FastV) see an image only as a run of placeholder positions.
This module maps that run back onto the tiling of :class:`~globalcom2.adapters.anyres.AnyresGeometry`: HF's
``pack_image_features`` emits the thumbnail's g*g tokens in raster order, then the crop tokens of the valid box of
the padded ``(rows*g) x (cols*g)`` grid row by row, each row followed by one ``image_newline`` token. The crop
regions are those of paper Eq. 2 / Eq. 4 (token ``(y, x)`` of the padded grid belongs to crop
``(y // g) * cols + x // g``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.anyres import AnyresGeometry
from ..core.plan import Plan

THUMBNAIL = 0  # region id of the thumbnail; crop j (row-major, 0-based) has region id j + 1
NEWLINE = -1  # region id of an image_newline token


@dataclass
class ImageTokenLayout:
    """Region and grid cell of each image token of one image, in LLM sequence order.

    Attributes:
        grid: ``(rows, cols)`` of crops (``(0, 0)`` for an image encoded as a single tile).
        g: patches per tile side.
        valid_box: unpadded area of the padded crop grid, ``(top, bottom, left, right)`` in cells.
        region: Long ``(n,)``: 0 = thumbnail, j + 1 = crop j, -1 = newline.
        cell: Long ``(n,)``: thumbnail cell (``y*g + x``) for the thumbnail, padded crop-grid cell
            (``y*cols*g + x``) for crops, -1 for newlines.
    """

    grid: tuple[int, int]
    g: int
    valid_box: tuple[int, int, int, int]
    region: torch.Tensor
    cell: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.region.numel())

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]


def single_tile_layout(g: int, newline: bool = True) -> ImageTokenLayout:
    """Layout of an image encoded as one tile: its g*g thumbnail tokens (plus one newline if HF adds one)."""
    nl = int(newline)
    return ImageTokenLayout(
        (0, 0), g, (0, 0, 0, 0),
        region=torch.cat([torch.full((g * g,), THUMBNAIL), torch.full((nl,), NEWLINE)]),
        cell=torch.cat([torch.arange(g * g), torch.full((nl,), -1)]),
    )  # fmt: skip


def image_token_layout(geo: AnyresGeometry, newline: bool = True) -> ImageTokenLayout:
    """Layout of the full (uncompressed) LLaVA-NeXT token run of one tiled image.

    Args:
        geo: the image's geometry (:meth:`~globalcom2.adapters.anyres.AnyresAdapter.geometry`); its crop tokens
            are the valid box itself (LLaVA-NeXT does not down-sample).
        newline: whether HF appends ``image_newline`` after every crop row.
    """
    if geo.resampled:
        raise ValueError("image_token_layout: the crop tokens must be the valid box (LLaVA-NeXT geometry)")
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    ys = torch.arange(top, bottom)[:, None]
    xs = torch.arange(left, right)[None, :]
    crop_cell = ys * (cols * g) + xs  # (h, w)
    crop_region = (ys // g) * cols + (xs // g) + 1
    tail = torch.full((bottom - top, int(newline)), NEWLINE)
    cell = torch.cat([torch.arange(g * g), torch.cat([crop_cell, tail], dim=1).reshape(-1)])
    region = torch.cat([torch.full((g * g,), THUMBNAIL), torch.cat([crop_region, tail], dim=1).reshape(-1)])
    return ImageTokenLayout(geo.grid, g, geo.box, region=region, cell=cell)


def plan_from_keep(
    layout: ImageTokenLayout, keep: torch.Tensor, crop_ratios: torch.Tensor | None = None, mode: str = "llm"
) -> Plan:
    """`Plan` of one image from a keep mask over its token run.

    Args:
        layout: the image's token layout.
        keep: Bool ``(n,)`` over the run, True = the token reaches the pruned layers.
        crop_ratios: r_j to record; default the achieved share kept per crop, k_j / N_j.
        mode: recorded in ``Plan.mode``.

    Returns:
        A `Plan` whose ``num_tokens`` counts the kept tokens of the run (newlines included).
    """
    g = layout.g
    rows, cols = layout.grid
    keep = keep.to(torch.bool).cpu()
    region, cell = layout.region, layout.cell
    is_thumb = region == THUMBNAIL
    thumbnail_mask = torch.zeros(g * g, dtype=torch.bool)
    thumbnail_mask[cell[is_thumb]] = keep[is_thumb]
    n = rows * cols
    crops_mask = torch.zeros(rows * g * cols * g, dtype=torch.bool)
    is_crop = region > 0
    crops_mask[cell[is_crop]] = keep[is_crop]
    crop_idx = region[is_crop] - 1
    kept = torch.zeros(n, dtype=torch.long).index_add_(0, crop_idx, keep[is_crop].long())
    valid = torch.zeros(n, dtype=torch.long).index_add_(0, crop_idx, torch.ones_like(crop_idx))
    if crop_ratios is None:
        crop_ratios = kept.float() / valid.clamp_min(1).float()
    return Plan(
        grid=layout.grid,
        thumbnail_mask=thumbnail_mask.reshape(g, g),
        crops_mask=crops_mask.reshape(rows * g, cols * g),
        crop_ratios=crop_ratios.float().cpu(),
        num_tokens=int(keep.sum()),
        num_tokens_full=layout.num_tokens,
        valid_box=layout.valid_box,
        crop_keep_counts=kept,
        crop_valid_counts=valid,
        mode=mode,
        thumbnail_order=thumbnail_mask.nonzero().reshape(-1),
    )
