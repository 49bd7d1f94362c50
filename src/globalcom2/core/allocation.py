"""Adaptive compression adjustment (paper Sec. 4.1, Eq. 2-4) and the allocation ablations of Table 2.

Every crop j gets a retention ratio r_j from how much of the thumbnail's importance falls in its region:
S_j (Eq. 2) -> sigma_j = softmax(S / tau) (Eq. 3) -> r_j = R * (1 + sigma_j - 1/n) (Eq. 4), capped at 1.
"""

from __future__ import annotations

import torch

from .budget import budget_counts
from .ranking import top_indices

ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


def crop_richness(
    thumb_scores: torch.Tensor, region_map: torch.Tensor, num_crops: int, kind: str
) -> torch.Tensor:
    """Information richness S_j of every crop from the thumbnail scores in its region (paper Eq. 2).

    Args:
        thumb_scores: ``(g*g,)`` thumbnail token scores.
        region_map: Long ``(g, g)`` crop index per thumbnail cell (:func:`~globalcom2.core.geometry.thumbnail_region_map`).
        num_crops: n.
        kind: ``"sum"`` or ``"max"``.

    Returns:
        ``(n,)`` float32.
    """
    s = thumb_scores.float().reshape(-1)
    idx = region_map.reshape(-1).to(s.device)
    if kind == "sum":
        return torch.zeros(num_crops, device=s.device).index_add_(0, idx, s)
    if kind == "max":
        init = torch.full((num_crops,), float("-inf"), device=s.device)
        return init.scatter_reduce(0, idx, s, reduce="amax", include_self=True)
    raise ValueError(f"richness kind must be 'sum' or 'max', got {kind!r}")


def ratios_from_sigma(sigma: torch.Tensor, ratio: float) -> torch.Tensor:
    """Eq. 4: r_j = min(1, R * (1 + sigma_j - mean(sigma))); the excess above 1 is not redistributed."""
    return (ratio * (1.0 + sigma - sigma.mean())).clamp(max=1.0)


def softmax_sigma(richness: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3 with the official stabilisation: exp((S - max S)/tau) / (sum exp(...) + 1e-8)."""
    e = torch.exp((richness - richness.max()) / tau)
    return e / (e.sum() + 1e-8)


def allocate_ratios(
    thumb_scores: torch.Tensor,
    region_map: torch.Tensor,
    num_crops: int,
    *,
    ratio: float,
    allocation: str = "softmax-sum",
    tau: float = 10.0,
) -> torch.Tensor:
    """Per-crop retention ratios r_j (paper Eq. 2-4; Table 2 variants).

    ``softmax-sum`` / ``softmax-max``: richness = sum / max of the region's thumbnail scores, then Eq. 3-4.
    ``topk-count``: sigma_j = share of the thumbnail's int(N*R) top tokens that fall in crop j, then Eq. 4.
    ``uniform``: r_j = R (FasterVLM-style per-tile top-k).

    Returns:
        ``(n,)`` float32 ratios in (0, 1].
    """
    s = thumb_scores.float().reshape(-1)
    if allocation == "uniform":
        return torch.full((num_crops,), float(ratio), device=s.device)
    if allocation in ("softmax-sum", "softmax-max"):
        richness = crop_richness(s, region_map, num_crops, allocation.split("-")[1])
        return ratios_from_sigma(softmax_sigma(richness, tau), ratio)
    if allocation == "topk-count":
        k, _ = budget_counts(s.numel(), 0, ratio)
        order = top_indices(s, k)
        counts = torch.zeros(num_crops, device=s.device).index_add_(
            0, region_map.reshape(-1).to(s.device)[order], torch.ones(k, device=s.device)
        )
        sigma = counts / counts.sum().clamp_min(1.0)
        return ratios_from_sigma(sigma, ratio)
    raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
