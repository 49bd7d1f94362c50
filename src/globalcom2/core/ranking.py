"""The tie rule: every ranking in GlobalCom² (paper Eq. 6 top-k, the thumbnail's top int(N*R), Table 2's top-k count).

Among equal scores the entry with the lower index wins, i.e. the token earlier in raster order (the thumbnail's
raster, a crop's raster, or whatever order the caller's last dimension has). A stable sort gives that on every device;
``torch.topk`` does not promise any order among exactly equal values.
"""

from __future__ import annotations

import torch


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, highest first; equal scores rank in index order (the tie rule)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest entries of a 1-D tensor, highest first, ties in index order (the tie rule)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k[j]`` highest scores of every row ``j`` (paper Eq. 6), ties by the tie rule."""
    keep = descending_rank(scores) < k.reshape(-1, *([1] * (scores.dim() - 1)))
    return keep if valid is None else keep & valid


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D Bool mask, ascending, given that it holds ``count`` of them.

    ``mask.nonzero()`` must read the mask on the host to size its output (a device synchronisation); with the count
    known from the geometry, a stable sort gives the same indices without waiting for the device.
    """
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]
