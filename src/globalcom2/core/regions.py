"""Regions and a virtual global view for native-resolution images (paper Eq. 2-7 without a thumbnail).

A native-resolution model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) encodes the whole image as one ``H x W`` grid of merged
tokens: no crops, no thumbnail, no [CLS]. GlobalCom² needs both views, so they are built from the image's own tokens:

* **Regions** (the crops of Eq. 2-6): rows split into ``nr = ceil(H / G)`` bands and columns into
  ``nc = ceil(W / G)`` bands, as evenly as possible: band ``i`` holds rows ``floor(i*H/nr) .. floor((i+1)*H/nr) - 1``
  (:func:`band_index`), so every region has at most ``G x G`` tokens and sizes differ by at most one row/column.
* **Global view** (the thumbnail of Eq. 2 and 5): the features average-pooled to ``min(G, H) x min(G, W)`` cells
  (cell ``a`` averages rows ``floor(a*H/p) .. ceil((a+1)*H/p) - 1``, ``torch.nn.functional.adaptive_avg_pool2d``),
  each cell scored by Eq. 7 against the mean of all ``H*W`` tokens. A cell lies over the region of the token at
  its centre (row ``floor((a + 1/2) * H / p)``, likewise for columns): the region map of Eq. 2. Its score map,
  bilinearly resized to ``H x W``, gives every token its global score (Eq. 5).
* **Local scores**: every token scored by Eq. 7 against the mean of its own region's tokens.

The view is virtual: it hands no token to the LLM. Eq. 2-4 allocate the budget ``K = int(R * H * W)``
(:func:`~globalcom2.core.budget.budget_counts` with no thumbnail tokens) over the regions, Eq. 5 mixes the two
scores, Eq. 6 keeps the top ``k_j`` of every region: :func:`native_selection_input` reduces an image to the one
selection's inputs (:class:`~globalcom2.core.select.SelectionInput`), so every option (allocation, scoring, alpha,
tau, the tie rule) works as for the tiled families.
"""

from __future__ import annotations

import functools
import math

import torch

from .budget import budget_counts, largest_fitting_ratio
from .layout import CropLayout
from .resize import bilinear_resize
from .select import SelectionInput


def band_index(n: int, g: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Band of every one of ``n`` rows (or columns) split into ``ceil(n / g)`` near-equal bands of at most ``g``.

    Band ``i`` starts at row ``floor(i * n / nb)``; row ``y`` is in band ``((y + 1) * nb - 1) // n``.

    Returns:
        Long ``(n,)``, non-decreasing.
    """
    nb = max(math.ceil(n / g), 1)
    return ((torch.arange(n, device=device) + 1) * nb - 1) // n


def region_grid(height: int, width: int, region_tokens: int) -> tuple[int, int]:
    """``(nr, nc)`` regions of an ``height x width`` merged-token grid with regions of at most ``G x G`` tokens."""
    return max(math.ceil(height / region_tokens), 1), max(math.ceil(width / region_tokens), 1)


def pooled_shape(height: int, width: int, region_tokens: int) -> tuple[int, int]:
    """``(ph, pw)`` cells of the virtual global view: at most ``G`` per side, never more than the grid has."""
    return min(region_tokens, height), min(region_tokens, width)


@functools.lru_cache(maxsize=256)
def _geometry(height: int, width: int, region_tokens: int) -> tuple[CropLayout, torch.Tensor]:
    """The region layout and the global view's region map of one grid size (host tensors, built once per size)."""
    rows, cols = band_index(height, region_tokens), band_index(width, region_tokens)
    layout = CropLayout.from_blocks(rows, cols, region_grid(height, width, region_tokens))
    ph, pw = pooled_shape(height, width, region_tokens)
    centre_r = ((2 * torch.arange(ph) + 1) * height) // (2 * ph)  # floor((a + 1/2) * H / ph)
    centre_c = ((2 * torch.arange(pw) + 1) * width) // (2 * pw)
    nc = layout.grid[1]
    region_map = (rows[centre_r][:, None] * nc + cols[centre_c][None, :]).reshape(-1)
    return layout, region_map


def region_layout(height: int, width: int, region_tokens: int) -> CropLayout:
    """The regions as a crop table (:class:`~globalcom2.core.layout.CropLayout`) of an ``height x width`` grid."""
    return _geometry(height, width, region_tokens)[0]


def native_ratio(num_tokens: int, ratio: float) -> float:
    """The R an image of ``num_tokens`` merged tokens is compressed at: ``ratio``, raised to the smallest R that
    keeps one token when ``int(ratio * num_tokens)`` is 0 (an image never vanishes from the prompt)."""
    if budget_counts(0, num_tokens, ratio)[1] >= 1 or num_tokens == 0:
        return ratio
    return largest_fitting_ratio(lambda r: budget_counts(0, num_tokens, r)[1], 1)


def native_num_tokens(num_tokens: int, ratio: float) -> int:
    """Tokens a native-resolution image of ``num_tokens`` merged tokens hands the LLM at R: ``int(R * H * W)``
    (:func:`~globalcom2.core.budget.budget_counts`, no thumbnail tokens), at least one."""
    return budget_counts(0, num_tokens, native_ratio(num_tokens, ratio))[1]


def native_selection_input(
    features: torch.Tensor, grid: tuple[int, int], region_tokens: int, ratio: float
) -> tuple[SelectionInput, CropLayout]:
    """Reduce one native-resolution image to the selection's inputs (module docstring; paper Eq. 2-7).

    Args:
        features: ``(H*W, D)`` merged-token features in raster order (what the LLM receives).
        grid: ``(H, W)`` merged tokens.
        region_tokens: G, the largest region side in merged tokens.
        ratio: this image's R (:func:`native_ratio`).

    Returns:
        ``(SelectionInput, layout)``: the regions as crops (table rows) and the pooled view as the thumbnail;
        ``layout`` maps the table back to the ``H x W`` grid.
    """
    height, width = grid
    layout, region_map = _geometry(height, width, region_tokens)
    ph, pw = pooled_shape(height, width, region_tokens)
    device = features.device
    x = features.float()
    n = layout.num_crops
    # One pass over the features: the mean of every region (rows 0..n-1) and of the whole image (row n).
    region, averaging = (t.to(device) for t in _averaging(height, width, region_tokens))
    means = averaging @ x  # (n + 1, D)
    dots = x @ means.T  # (H*W, n + 1): every token against every region mean and the image mean
    norms = x.norm(dim=-1).clamp_min(1e-8)
    mean_norms = means.norm(dim=-1).clamp_min(1e-8)
    # Local scores: Eq. 7 of every token against its own region's mean.
    local_flat = -dots.gather(1, region[:, None]).squeeze(1) / (norms * mean_norms[region])
    # Global view: Eq. 7 of the pooled cells against the image mean. Adaptive average pooling is separable: two
    # small matmuls with the per-axis averaging matrices; without pooling the cells are the tokens themselves.
    if (ph, pw) == (height, width):
        global_cells = -dots[:, n] / (norms * mean_norms[n])
    else:
        grid_x = x.reshape(height, width, -1)
        if ph != height:
            grid_x = torch.einsum("ah,hwd->awd", _pool_matrix(height, ph).to(device), grid_x)
        if pw != width:
            grid_x = torch.einsum("bw,awd->abd", _pool_matrix(width, pw).to(device), grid_x)
        cells = grid_x.reshape(ph * pw, -1)
        global_cells = -(cells @ means[n]) / (cells.norm(dim=-1).clamp_min(1e-8) * mean_norms[n])
    global_map = bilinear_resize(global_cells.reshape(ph, pw), (height, width))
    # both score maps into the region table in one scatter: (2, n, M), float64
    local, global_table = layout.to_tables(torch.stack((local_flat.double(), global_map.reshape(-1))), 0.0)
    return (
        SelectionInput(
            global_cells,
            local,
            _valid_table(height, width, region_tokens).to(device),
            global_table,
            region_map.to(device),
            ratio,
            height * width,
        ),  # fmt: skip
        layout,
    )


@functools.lru_cache(maxsize=256)
def _valid_table(height: int, width: int, region_tokens: int) -> torch.Tensor:
    """Bool ``(n, M)`` valid cells of the region table of one grid size (on the CPU, built once, never written)."""
    return _geometry(height, width, region_tokens)[0].valid()


@functools.lru_cache(maxsize=256)
def _averaging(height: int, width: int, region_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(region of every token (H*W,), (n + 1, H*W) averaging matrix)``: rows 0..n-1 average each region's
    tokens, row n all tokens (built once per grid size, on the CPU, never written)."""
    layout = _geometry(height, width, region_tokens)[0]
    n = layout.num_crops
    region = layout.slot // layout.width
    onehot = torch.zeros(n + 1, height * width)
    onehot[region, torch.arange(height * width)] = 1.0
    onehot[n] = 1.0
    return region, onehot / onehot.sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=256)
def _pool_matrix(n: int, p: int) -> torch.Tensor:
    """``(p, n)`` averaging matrix of adaptive average pooling: row ``a`` averages ``floor(a*n/p) .. ceil((a+1)*n/p)-1``
    (built once per size pair, on the CPU, never written)."""
    a = torch.arange(p)[:, None]
    i = torch.arange(n)[None, :]
    inside = (i >= (a * n) // p) & (i < -((-(a + 1) * n) // p))
    return inside.float() / inside.sum(dim=1, keepdim=True).float()
