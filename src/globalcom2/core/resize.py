"""Bilinear resize of a score map, written out so that it gives the same bits on every machine (paper Eq. 5).

The global sub-maps of Eq. 5 are the thumbnail's score map resized onto the crops. ``F.interpolate`` computes the
same bilinear (``align_corners=False``) weights, but its CPU kernels round differently from machine to machine
(vector width, fused multiply-add): two cells that are exact copies of one source value (the edge-clamped border)
come out equal on one CPU and one ulp apart on another, and a top-k over them then depends on the CPU. Here every
weight and product is computed with separate, correctly rounded float64 operations, and a clamped sample takes its
source value exactly (weight 1 on one neighbour), so equal inputs give equal outputs everywhere.

For output cell ``i`` of an axis resized from ``n_in`` to ``n_out`` cells::

    src = max((i + 0.5) * n_in / n_out - 0.5, 0);  i0 = floor(src);  i1 = min(i0 + 1, n_in - 1)
    w1 = src - i0 if i1 > i0 else 0;  w0 = 1 - w1

and ``out[y, x] = w0y * (w0x * m[y0, x0] + w1x * m[y0, x1]) + w1y * (w0x * m[y1, x0] + w1x * m[y1, x1])``,
the order in which PyTorch's kernel combines the four neighbours.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=256)
def _axis(n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """Neighbour indices and weights ``(i0, i1, w0, w1)`` of every output cell along one axis (on the CPU; built
    once per size pair and never written)."""
    i = torch.arange(n_out, dtype=torch.float64)
    src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = torch.where(i1 > i0, src - i0.double(), torch.zeros_like(src))
    return i0, i1, 1.0 - w1, w1


def bilinear_resize(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a 2-D score map bilinearly (``align_corners=False``), deterministically (see module docstring).

    Args:
        scores: ``(h, w)`` map.
        size: ``(H, W)`` target size (either may be 0).

    Returns:
        ``(H, W)`` float64 map (float32 on MPS, which has no float64).
    """
    height, width = int(size[0]), int(size[1])
    wide = torch.float32 if scores.device.type == "mps" else torch.float64
    m = scores.to(wide)
    if height == 0 or width == 0:
        return m.new_zeros(height, width)
    if tuple(m.shape) == (height, width):
        return m.clone()
    y0, y1, wy0, wy1 = (
        t.to(m.device, t.dtype if t.dtype == torch.long else wide) for t in _axis(m.shape[0], height)
    )
    x0, x1, wx0, wx1 = (
        t.to(m.device, t.dtype if t.dtype == torch.long else wide) for t in _axis(m.shape[1], width)
    )
    cols = wx0 * m[:, x0] + wx1 * m[:, x1]  # (h, W): resized along x first, as PyTorch does
    return wy0[:, None] * cols[y0] + wy1[:, None] * cols[y1]
