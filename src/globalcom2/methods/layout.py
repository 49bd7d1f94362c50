"""Where every image token of an uncompressed image sits in the LLM sequence, and back to a `Plan`.

Methods that prune inside the LLM (FastV, PDrop, SparseVLM and the GlobalCom² combinations) see an image only as
the positions of its image tokens. This module maps each image's run back onto its tiling, one rule per token
layout (markers such as InternVL's ``<img>`` or Idefics3's ``<row_r_col_c>`` are not image tokens: they are not in
the run and are never pruned):

- **anyres** (LLaVA-NeXT, OneVision; :func:`image_token_layout`): HF's ``pack_image_features`` emits the
  thumbnail's g*g tokens in raster order, then the crop tokens of the valid box of the padded
  ``(rows*g) x (cols*g)`` grid row by row (OneVision: its down-sampled token grid, each token in the crop of its
  anchor patch, :func:`~globalcom2.adapters.anyres.resample_blocks`), each row followed by one ``image_newline``;
- **tiles** (InternVL, Idefics3/SmolVLM, Aya Vision, Cohere2 Vision, Llama 4, Gemma 3;
  :func:`tile_token_layout`): the crops row-major, each a full g x g block in raster order, then the thumbnail
  (Gemma 3: the original image's run first, then its pan-and-scan crops); an image of one tile is its own
  thumbnail. Markers between the runs (Aya's ``TILE_k``, Llama 4's tile separators, Cohere2's line breaks,
  Gemma 3's ``<start_of_image>`` framing) are not image tokens.
- **native** (Qwen-VL; :func:`native_token_layout`): the ``H x W`` merged tokens in raster order; the crops are the
  regions of :mod:`globalcom2.core.regions` (bands of at most G x G tokens); no thumbnail tokens (the global view
  is virtual).

The crop regions are those of paper Eq. 2 / Eq. 4 (token ``(y, x)`` of the padded grid belongs to crop
``(y // g) * cols + x // g``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.anyres import AnyresGeometry, footprint, resample_blocks
from ..core.plan import Plan
from ..core.regions import band_index, pooled_shape, region_grid

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
            (``y*cols*g + x``) for crops (with ``token_grid``: the crop token's index ``y*W + x`` in that grid),
            -1 for newlines.
        token_grid: ``(H, W)`` of a down-sampled crop token grid (OneVision), else None.
        native: ``(H, W)`` of a native-resolution image (the crops are regions of that token grid, ``g`` is the
            region size G, ``cell`` is ``y*W + x``), else None.
    """

    grid: tuple[int, int]
    g: int
    valid_box: tuple[int, int, int, int]
    region: torch.Tensor
    cell: torch.Tensor
    token_grid: tuple[int, int] | None = None
    native: tuple[int, int] | None = None

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
        geo: the image's geometry (:meth:`~globalcom2.adapters.anyres.AnyresAdapter.geometry`); a down-sampled
            crop token grid (OneVision) maps each token to the crop of its anchor patch.
        newline: whether HF appends ``image_newline`` after every crop row.
    """
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    if geo.resampled:
        height, width = geo.token_grid
        row_block, col_block = resample_blocks(geo.box, geo.token_grid, g)
        crop_region = row_block[:, None] * cols + col_block[None, :] + 1
        crop_cell = torch.arange(height * width).reshape(height, width)
    else:
        ys = torch.arange(top, bottom)[:, None]
        xs = torch.arange(left, right)[None, :]
        crop_cell = ys * (cols * g) + xs  # (h, w)
        crop_region = (ys // g) * cols + (xs // g) + 1
    tail = torch.full((crop_cell.shape[0], int(newline)), NEWLINE)
    cell = torch.cat([torch.arange(g * g), torch.cat([crop_cell, tail], dim=1).reshape(-1)])
    region = torch.cat([torch.full((g * g,), THUMBNAIL), torch.cat([crop_region, tail], dim=1).reshape(-1)])
    grid = geo.token_grid if geo.resampled else None
    return ImageTokenLayout(geo.grid, g, geo.box, region=region, cell=cell, token_grid=grid)


def tile_token_layout(grid: tuple[int, int], g: int, thumbnail_first: bool = False) -> ImageTokenLayout:
    """Layout of one image of InternVL's tile order (InternVL, Idefics3/SmolVLM, Aya Vision): ``rows x cols`` crops
    row-major, each a full g x g block in raster order, then the thumbnail (``thumbnail_first``: the thumbnail's
    run first, as Gemma 3 reads the original image before its crops); a ``1 x 1`` grid is one tile, the image's own
    thumbnail (no crops). Markers between the runs are not image tokens and are not part of the layout."""
    rows, cols = grid
    if rows * cols == 1:
        return single_tile_layout(g, newline=False)
    n = rows * cols
    j = torch.arange(n)[:, None]
    a = torch.arange(g * g)[None, :]
    y = (j // cols) * g + a // g
    x = (j % cols) * g + a % g
    crop_cell, crop_region = (y * (cols * g) + x).reshape(-1), (j + 1).expand(n, g * g).reshape(-1)
    thumb_cell, thumb_region = torch.arange(g * g), torch.full((g * g,), THUMBNAIL)
    if thumbnail_first:
        cell, region = torch.cat([thumb_cell, crop_cell]), torch.cat([thumb_region, crop_region])
    else:
        cell, region = torch.cat([crop_cell, thumb_cell]), torch.cat([crop_region, thumb_region])
    return ImageTokenLayout((rows, cols), g, (0, rows * g, 0, cols * g), region=region, cell=cell)


def native_token_layout(height: int, width: int, region_tokens: int) -> ImageTokenLayout:
    """Layout of one native-resolution image (Qwen-VL) of ``height x width`` merged tokens: raster order, token
    ``(y, x)`` in region ``band(y) * nc + band(x)`` (:func:`~globalcom2.core.regions.band_index`, regions of at
    most ``region_tokens`` per side), region id j + 1 for region j as for crops."""
    rows, cols = band_index(height, region_tokens), band_index(width, region_tokens)
    nr, nc = region_grid(height, width, region_tokens)
    region = (rows[:, None] * nc + cols[None, :] + 1).reshape(-1)
    return ImageTokenLayout((nr, nc), region_tokens, (0, height, 0, width), region=region,
                            cell=torch.arange(height * width), native=(height, width))  # fmt: skip


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
    thumb_shape = (g, g) if layout.native is None else pooled_shape(*layout.native, g)
    thumbnail_mask = torch.zeros(thumb_shape[0] * thumb_shape[1], dtype=torch.bool)
    thumbnail_mask[cell[is_thumb]] = keep[is_thumb]
    n = rows * cols
    is_crop = region > 0
    token_mask = None
    crops_shape = (rows * g, cols * g) if layout.native is None else layout.native
    if layout.token_grid is not None:  # down-sampled crop tokens: the footprint of the kept ones on the cells
        height, width = layout.token_grid
        token_mask = torch.zeros(height * width, dtype=torch.bool)
        token_mask[cell[is_crop]] = keep[is_crop]
        token_mask = token_mask.reshape(height, width)
        crops_mask = footprint(token_mask, layout.valid_box, (rows * g, cols * g)).reshape(-1)
    else:
        crops_mask = torch.zeros(crops_shape[0] * crops_shape[1], dtype=torch.bool)
        crops_mask[cell[is_crop]] = keep[is_crop]
    crop_idx = region[is_crop] - 1
    kept = torch.zeros(n, dtype=torch.long).index_add_(0, crop_idx, keep[is_crop].long())
    valid = torch.zeros(n, dtype=torch.long).index_add_(0, crop_idx, torch.ones_like(crop_idx))
    if crop_ratios is None:
        crop_ratios = kept.float() / valid.clamp_min(1).float()
    return Plan(
        grid=layout.grid,
        thumbnail_mask=thumbnail_mask.reshape(thumb_shape),
        crops_mask=crops_mask.reshape(crops_shape),
        crop_ratios=crop_ratios.float().cpu(),
        num_tokens=int(keep.sum()),
        num_tokens_full=layout.num_tokens,
        valid_box=layout.valid_box,
        crop_keep_counts=kept,
        crop_valid_counts=valid,
        mode=mode,
        thumbnail_order=thumbnail_mask.nonzero().reshape(-1),
        token_mask=token_mask,
        token_grid=layout.token_grid,
    )
