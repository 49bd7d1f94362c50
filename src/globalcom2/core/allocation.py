"""Adaptive compression adjustment (paper Sec. 4.1, Eq. 2-4) and the allocation ablations of Table 2.

Every crop j gets a retention ratio r_j from how much of the thumbnail's importance falls in its region:
S_j (Eq. 2) -> sigma_j = softmax(S / tau) (Eq. 3) -> r_j = R * (1 + sigma_j - 1/n) (Eq. 4), capped at 1.

Every function takes leading batch dimensions (the images of a batch, each with its own R and its own number of
crops, padded to the batch's largest ``n``; ``crop_mask`` marks the real crops). Every sum (the region sums of
Eq. 2, the softmax denominator of Eq. 3, the mean of Eq. 4) is order-free (:mod:`globalcom2.core.sums`), so an image
gets the same bits alone, in any batch, with any padding and on every machine.
"""

from __future__ import annotations

import torch

from .budget import budget_counts
from .ranking import descending_rank
from .sums import exact_segment_sum, exact_sum

ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


def _ratio_column(ratio: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """R as a float32 ``(..., 1)`` column (float32(R) * x is what ``R * x`` computes for a Python float R)."""
    if not isinstance(ratio, torch.Tensor):
        ratio = torch.tensor(ratio, dtype=torch.float64)
    r = ratio.to(device=like.device, dtype=torch.float32)
    return r.reshape(*r.shape, 1) if r.dim() else r


def crop_richness(
    thumb_scores: torch.Tensor, region_map: torch.Tensor, num_crops: int, kind: str
) -> torch.Tensor:
    """Information richness S_j of every crop from the thumbnail scores in its region (paper Eq. 2).

    Args:
        thumb_scores: ``(..., g*g)`` thumbnail token scores.
        region_map: Long ``(..., g*g)`` crop index per thumbnail cell
            (:func:`~globalcom2.core.layout.thumbnail_region_map`); leading dims broadcast to the scores'.
        num_crops: n (the padded count when batched; crops no cell maps to get 0 / -inf).
        kind: ``"sum"`` (order-free: :func:`~globalcom2.core.sums.exact_segment_sum`) or ``"max"``.

    Returns:
        ``(..., n)`` float32.
    """
    s = thumb_scores.float()
    if kind == "sum":
        return exact_segment_sum(s, region_map, num_crops)
    if kind == "max":
        idx = region_map.to(s.device).expand_as(s)
        init = torch.full((*s.shape[:-1], num_crops), float("-inf"), device=s.device)
        return init.scatter_reduce(-1, idx, s, reduce="amax", include_self=True)
    raise ValueError(f"richness kind must be 'sum' or 'max', got {kind!r}")


def _mask(x: torch.Tensor, crop_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool) if crop_mask is None else crop_mask.to(x.device)


def ratios_from_sigma(
    sigma: torch.Tensor, ratio: float | torch.Tensor, crop_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 4: r_j = min(1, R * (1 + sigma_j - mean(sigma))); the excess above 1 is not redistributed.

    ``ratio``: a float, or one R per leading index; the mean is over the real crops (``crop_mask``), whose
    others get r = 0.
    """
    mask = _mask(sigma, crop_mask)
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(sigma.dtype)
    mean = exact_sum(torch.where(mask, sigma, 0.0)) / count
    r = (_ratio_column(ratio, sigma) * (1.0 + sigma - mean)).clamp(max=1.0)
    return torch.where(mask, r, 0.0)


def softmax_sigma(richness: torch.Tensor, tau: float, crop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 with the official stabilisation: exp((S - max S)/tau) / (sum exp(...) + 1e-8), over the real crops."""
    mask = _mask(richness, crop_mask)
    top = torch.where(mask, richness, float("-inf")).amax(-1, keepdim=True)
    e = torch.where(mask, torch.exp((richness - top) / tau), 0.0)
    return e / (exact_sum(e) + 1e-8)


def allocate_ratios(
    thumb_scores: torch.Tensor,
    region_map: torch.Tensor,
    num_crops: int,
    *,
    ratio: float | torch.Tensor,
    allocation: str = "softmax-sum",
    tau: float = 10.0,
    crop_mask: torch.Tensor | None = None,
    thumbnail_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-crop retention ratios r_j (paper Eq. 2-4; Table 2 variants).

    ``softmax-sum`` / ``softmax-max``: richness = sum / max of the region's thumbnail scores, then Eq. 3-4.
    ``topk-count``: sigma_j = share of the thumbnail's int(N*R) top tokens that fall in crop j, then Eq. 4.
    ``uniform``: r_j = R (FasterVLM-style per-tile top-k).

    Args:
        thumb_scores: ``(..., N)``; leading dims are images of a batch.
        ratio: R, a float or one per image (``(...)``).
        crop_mask: Bool ``(..., n)``: the real crops of each image when batched images are padded to n crops.
        thumbnail_keep: ``topk-count`` only: Bool ``(..., N)``, the thumbnail's kept tokens when the caller has
            them (required when ``ratio`` is one R per image); default: the top ``int(N*R)`` by the tie rule.

    Returns:
        ``(..., n)`` float32 ratios in (0, 1] (0 on padded crops).
    """
    s = thumb_scores.float()
    if allocation == "uniform":
        r = _ratio_column(ratio, s).expand(*s.shape[:-1], num_crops)
        return torch.where(_mask(r, crop_mask), r, 0.0)
    if allocation in ("softmax-sum", "softmax-max"):
        richness = crop_richness(s, region_map, num_crops, allocation.split("-")[1])
        return ratios_from_sigma(softmax_sigma(richness, tau, crop_mask), ratio, crop_mask)
    if allocation == "topk-count":
        if thumbnail_keep is None:  # the thumbnail's top int(N*R), ranked by the tie rule
            k, _ = budget_counts(s.shape[-1], 0, float(ratio))
            thumbnail_keep = descending_rank(s) < k
        counts = crop_richness(thumbnail_keep.float(), region_map, num_crops, "sum")  # integers: exact
        sigma = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        return ratios_from_sigma(sigma, ratio, crop_mask)
    raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
