"""Geometry of anyres tiling on the patch grid: crop regions on the thumbnail, unpadding, global sub-maps.

The crops of an image form a padded ``(rows*g) x (cols*g)`` patch grid; the image occupies a centred rectangle of
it (the *valid box*). These helpers implement the geometry behind paper Eq. 2 (crop regions on the thumbnail) and
Eq. 5 (the thumbnail's score map resized onto the crops), all as tensor ops over tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # (top, bottom, left, right), half-open, in patch cells


def valid_box(orig_height: int, orig_width: int, grid_height: int, grid_width: int) -> Box:
    """Unpadded area of the padded crop grid, by the rule of HF's ``unpad_image`` (LLaVA-NeXT).

    Args:
        orig_height, orig_width: original image size in pixels.
        grid_height, grid_width: padded crop grid in patch cells, ``rows*g`` and ``cols*g``.

    Returns:
        ``(top, bottom, left, right)``; the image's tokens are ``grid[top:bottom, left:right]``.
    """
    if orig_height <= 0 or orig_width <= 0:
        raise ValueError(f"image size must be positive, got {orig_height}x{orig_width} (height x width)")
    if orig_width / orig_height > grid_width / grid_height:
        new_height = int(round(orig_height * (grid_width / orig_width), 7))
        pad = (grid_height - new_height) // 2
        return pad, grid_height - pad, 0, grid_width
    new_width = int(round(orig_width * (grid_height / orig_height), 7))
    pad = (grid_width - new_width) // 2
    return 0, grid_height, pad, grid_width - pad


def grid_to_tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(..., rows*g, cols*g)`` image-layout grid -> ``(..., rows*cols, g, g)`` tiles in row-major order."""
    *lead, gh, gw = x.shape
    g = gh // rows
    x = x.reshape(*lead, rows, g, cols, g).movedim(-2, -3)  # (..., rows, cols, g, g)
    return x.reshape(*lead, rows * cols, g, g)


def tiles_to_grid(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`grid_to_tiles`: ``(..., rows*cols, g, g)`` -> ``(..., rows*g, cols*g)``."""
    *lead, _, g, _ = x.shape
    x = x.reshape(*lead, rows, cols, g, g).movedim(-3, -2)  # (..., rows, g, cols, g)
    return x.reshape(*lead, rows * g, cols * g)


def valid_grid_mask(grid_height: int, grid_width: int, box: Box, device=None) -> torch.Tensor:
    """Bool ``(grid_height, grid_width)``: True inside the valid box."""
    top, bottom, left, right = box
    r = torch.arange(grid_height, device=device)
    c = torch.arange(grid_width, device=device)
    return ((r >= top) & (r < bottom))[:, None] & ((c >= left) & (c < right))[None, :]


def thumbnail_region_map(g: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """Crop index of every thumbnail cell (paper Eq. 2 regions), Long ``(g, g)``.

    Cell (i, j) belongs to crop ``(min(i // ph, rows-1), min(j // pw, cols-1))`` with ``ph = max(g // rows, 1)``,
    ``pw = max(g // cols, 1)``: the last row/column of crops absorbs the remainder, as in the official code.
    """
    ph, pw = max(g // rows, 1), max(g // cols, 1)
    i = (torch.arange(g, device=device) // ph).clamp(max=rows - 1)
    j = (torch.arange(g, device=device) // pw).clamp(max=cols - 1)
    return i[:, None] * cols + j[None, :]


def global_submaps(thumb_scores: torch.Tensor, rows: int, cols: int, box: Box) -> torch.Tensor:
    """Thumbnail scores resized onto the crops (the global sub-maps of paper Eq. 5).

    The ``(g, g)`` thumbnail map is bilinearly resized (align_corners=False) to the valid box and written into the
    padded crop grid; cutting that grid into tiles gives each crop its sub-map, the same as cutting the resized map
    crop by crop with accumulated offsets.

    Args:
        thumb_scores: ``(g, g)`` or ``(g*g,)`` thumbnail scores.
        rows, cols: crop grid.
        box: valid box of the padded crop grid.

    Returns:
        ``(rows*cols, g, g)`` float32; zero outside the valid area.
    """
    g = int(round(thumb_scores.numel() ** 0.5))
    top, bottom, left, right = box
    out = thumb_scores.new_zeros(rows * g, cols * g, dtype=torch.float32)
    if bottom > top and right > left:
        resized = F.interpolate(
            thumb_scores.float().reshape(1, 1, g, g),
            size=(bottom - top, right - left),
            mode="bilinear",
            align_corners=False,
        )
        out[top:bottom, left:right] = resized[0, 0]
    return grid_to_tiles(out, rows, cols)
