"""Crops as rows of a table: the one data layout the selection of paper Eq. 2-6 works on.

A tiled model hands its LLM the crop tokens as a 2-D token grid cut into ``rows x cols`` rectangular crop blocks
(for example the unpadded part of a padded patch grid, that grid down-sampled, or a grid of merged patches). A :class:`CropLayout` maps that grid to an ``(n, M)`` table, one row per crop in row-major
crop order and the crop's tokens in raster order inside its block (unused table cells are invalid). The position of
a token in its row is its index in the crop's valid-token list, the index the official code uses.

Also here: the thumbnail cell -> crop map of Eq. 2 and the tile <-> image-layout reshapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


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


def thumbnail_region_map(
    g: int, rows: int, cols: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Crop index of every thumbnail token (paper Eq. 2 regions), Long ``(g*g,)`` in thumbnail raster order.

    Cell (i, j) belongs to crop ``(min(i // ph, rows-1), min(j // pw, cols-1))`` with ``ph = max(g // rows, 1)``,
    ``pw = max(g // cols, 1)``: the last row/column of crops absorbs the remainder, as in the official code.
    Built once per ``(g, rows, cols)`` on the CPU (shared: never write into it) and moved to ``device``.
    """
    return _thumbnail_region_map(g, rows, cols).to(device)


@functools.lru_cache(maxsize=256)
def _thumbnail_region_map(g: int, rows: int, cols: int) -> torch.Tensor:
    ph, pw = max(g // rows, 1), max(g // cols, 1)
    i = (torch.arange(g) // ph).clamp(max=rows - 1)
    j = (torch.arange(g) // pw).clamp(max=cols - 1)
    return (i[:, None] * cols + j[None, :]).reshape(-1)


@dataclass(frozen=True)
class CropLayout:
    """Where the tokens of an ``(H, W)`` crop-token grid sit in the ``(n, M)`` crop table.

    Attributes:
        grid: ``(rows, cols)`` of crops.
        shape: ``(H, W)`` of the token grid.
        width: M, the table's row length (the largest block's size).
        slot: Long ``(H*W,)``: flat table position of every grid token (raster order of the grid).
    """

    grid: tuple[int, int]
    shape: tuple[int, int]
    width: int
    slot: torch.Tensor

    @classmethod
    def from_blocks(
        cls, row_block: torch.Tensor, col_block: torch.Tensor, grid: tuple[int, int]
    ) -> CropLayout:
        """Layout of a grid whose row ``y`` belongs to crop row ``row_block[y]`` and column ``x`` to ``col_block[x]``.

        Args:
            row_block: Long ``(H,)``, non-decreasing crop-row index of every grid row.
            col_block: Long ``(W,)``, non-decreasing crop-column index of every grid column.
            grid: ``(rows, cols)``; a crop may own no row or column (it then has no valid token).
        """
        rows, cols = grid
        height, width = int(row_block.numel()), int(col_block.numel())
        block_h = torch.bincount(row_block, minlength=rows)
        block_w = torch.bincount(col_block, minlength=cols)
        row_off = torch.cumsum(block_h, 0) - block_h
        col_off = torch.cumsum(block_w, 0) - block_w
        m = max(int(block_h.max()) * int(block_w.max()), 1) if height and width else 1
        a, b = row_block[:, None], col_block[None, :]
        within = (torch.arange(height, device=a.device)[:, None] - row_off[a]) * block_w[b] + (
            torch.arange(width, device=a.device)[None, :] - col_off[b]
        )
        slot = ((a * cols + b) * m + within).reshape(-1)
        return cls(grid=(rows, cols), shape=(height, width), width=m, slot=slot)

    @classmethod
    def from_tiles(
        cls, grid: tuple[int, int], g: int, device: torch.device | str | None = None
    ) -> CropLayout:
        """Layout of a ``(rows*g) x (cols*g)`` grid of full ``g x g`` crops (table row = the tile in raster order)."""
        rows, cols = grid
        return cls.from_blocks(
            torch.arange(rows * g, device=device) // g, torch.arange(cols * g, device=device) // g, grid
        )

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_table(self, values: torch.Tensor, fill: float | bool | int = 0) -> torch.Tensor:
        """``(H, W)`` grid values -> ``(n, M)`` table; cells no token maps to hold ``fill``."""
        out = torch.full((self.num_crops * self.width,), fill, dtype=values.dtype, device=values.device)
        return out.index_copy(0, self.slot.to(values.device), values.reshape(-1)).reshape(self.num_crops, -1)

    def to_tables(self, values: torch.Tensor, fill: float | bool | int = 0) -> torch.Tensor:
        """``(k, H*W)`` values of ``k`` grids -> ``(k, n, M)`` tables in one scatter (:meth:`to_table` for each)."""
        k, device = values.shape[0], values.device
        out = torch.full((k, self.num_crops * self.width), fill, dtype=values.dtype, device=device)
        out = out.index_copy(1, self.slot.to(device), values.reshape(k, -1))
        return out.reshape(k, self.num_crops, -1)

    def from_table(self, table: torch.Tensor) -> torch.Tensor:
        """``(n, M)`` table -> ``(H, W)`` grid (the inverse of :meth:`to_table` on the grid's cells)."""
        return table.reshape(-1)[self.slot.to(table.device)].reshape(self.shape)

    def valid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(n, M)``: table cells that hold a token."""
        return self.to_table(torch.ones(self.shape, dtype=torch.bool, device=device), False)
