"""The GlobalCom² selection (paper Sec. 4.1-4.2, Eq. 2-6): one family-agnostic function for every model and mode.

Input is a tiled image already reduced to tensors: the thumbnail's token scores, each crop's own token scores as
rows of a table (:class:`~globalcom2.core.layout.CropLayout`), which table cells are valid tokens, the thumbnail
sub-map of every crop (Eq. 5) and which crop every thumbnail token lies over (Eq. 2). Output: which tokens are kept,
the per-crop ratios r_j and counts. Where the kept tokens go in the LLM's sequence is the family's business.

**Tie rule** (:mod:`globalcom2.core.ranking`). Among equal scores the token earlier in raster order wins: the
thumbnail's raster order, and inside a crop that crop's raster order (its row of the table). Every top-k here, and so
every family, mode, baseline and the vLLM plugin, ranks with that module's stable sort. The official code calls
``torch.topk``, whose order among exactly equal scores depends on the device and kernel; reference mode follows this
rule instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocation import allocate_ratios
from .budget import budget_counts, split_budget
from .ranking import top_indices, topk_mask

SCORINGS = ("holistic", "local", "global")
MODES = ("budget", "reference")


def _wide(x: torch.Tensor) -> torch.Tensor:
    # float64 keeps distinct float32 scores distinct after normalisation (MPS has no float64).
    return x.float() if x.device.type == "mps" else x.double()


def _l2_normalise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, _wide(x), torch.zeros((), dtype=_wide(x).dtype, device=x.device))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def holistic_scores(
    local: torch.Tensor, global_: torch.Tensor, valid: torch.Tensor, *, scoring: str, alpha: float
) -> torch.Tensor:
    """Token scores inside each crop (paper Eq. 5), each source L2-normalised over the crop's valid tokens.

    Args:
        local: ``(n, M)`` each crop's own scores s^L.
        global_: ``(n, M)`` the thumbnail's resized sub-map s^G for each crop.
        valid: Bool ``(n, M)``.
        scoring: ``"holistic"`` (alpha * s^G + (1 - alpha) * s^L), ``"local"`` or ``"global"`` (Table 3).
        alpha: weight of the global score.

    Returns:
        ``(n, M)`` float64 (float32 on MPS); ``-inf`` on invalid cells.
    """
    if scoring == "holistic":
        s = alpha * _l2_normalise(global_, valid) + (1 - alpha) * _l2_normalise(local, valid)
    elif scoring == "local":
        s = _l2_normalise(local, valid)
    elif scoring == "global":
        s = _l2_normalise(global_, valid)
    else:
        raise ValueError(f"`scoring` must be one of {SCORINGS}, got {scoring!r}")
    return s.masked_fill(~valid, float("-inf"))


@dataclass
class Selection:
    """Kept tokens of one tiled image (the output of :func:`select_tokens`).

    Attributes:
        thumbnail_keep: Bool ``(N,)`` in thumbnail raster order.
        thumbnail_order: Long ``(k0,)``: kept thumbnail tokens in emission order (raster order in budget mode,
            descending score in reference mode, as the official code).
        crop_keep: Bool ``(n, M)`` kept crop tokens, table layout.
        crop_ratios: ``(n,)`` r_j (Eq. 4).
        crop_keep_counts: Long ``(n,)`` kept tokens per crop.
        crop_valid_counts: Long ``(n,)`` valid tokens N_j per crop.
    """

    thumbnail_keep: torch.Tensor
    thumbnail_order: torch.Tensor
    crop_keep: torch.Tensor
    crop_ratios: torch.Tensor
    crop_keep_counts: torch.Tensor
    crop_valid_counts: torch.Tensor


def select_tokens(
    thumbnail_scores: torch.Tensor,
    crop_scores: torch.Tensor,
    crop_valid: torch.Tensor,
    global_scores: torch.Tensor,
    region_map: torch.Tensor,
    *,
    ratio: float,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
    num_crop_tokens: int | None = None,
) -> Selection:
    """GlobalCom² on one tiled image (paper Eq. 2-6), in budget or reference mode.

    1. Thumbnail: keep its top ``int(N * R)`` tokens (Eq. 1-2 scores).
    2. r_j from the thumbnail scores over each crop's region (Eq. 2-4, ``allocation`` = Table 2).
    3. Crop tokens scored by Eq. 5 (``scoring`` = Table 3) and the top k_j of crop j kept (Eq. 6), with
       k_j = int(N_j * r_j) (reference mode, the official counts) or K = int(R * sum N_j) split by r_j * N_j
       (budget mode, :func:`~globalcom2.core.budget.split_budget`).

    Args:
        thumbnail_scores: ``(N,)`` thumbnail token scores, raster order.
        crop_scores: ``(n, M)`` each crop's own token scores s^L (table layout; invalid cells are ignored).
        crop_valid: Bool ``(n, M)`` valid table cells.
        global_scores: ``(n, M)`` each crop's thumbnail sub-map (Eq. 5).
        region_map: Long ``(N,)`` crop index of every thumbnail token
            (:func:`~globalcom2.core.layout.thumbnail_region_map`).
        ratio, mode, allocation, scoring, alpha, tau: see :class:`globalcom2.GlobalComConfig`.
            ``n = 0`` (no crops) selects the thumbnail only.
        num_crop_tokens: sum_j N_j (``crop_valid.sum()``) when the caller knows it from the geometry: then nothing
            here waits for the device (no host synchronisation); computed from ``crop_valid`` when None.

    Returns:
        A :class:`Selection`; ties are broken by the tie rule (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    thumb = thumbnail_scores.float().reshape(-1)
    device = thumb.device
    n = crop_scores.shape[0]
    num_valid = crop_valid.sum(-1)
    if num_crop_tokens is None:
        num_crop_tokens = int(num_valid.sum())
    k0, total = budget_counts(thumb.numel(), num_crop_tokens, ratio)
    order = top_indices(thumb, k0)
    thumbnail_keep = torch.zeros(thumb.numel(), dtype=torch.bool, device=device)
    thumbnail_keep[order] = True
    if mode == "budget":
        order = order.sort().values  # raster order; k0 is known, so no data-dependent shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Selection(thumbnail_keep, order, crop_valid.clone(), thumb.new_zeros(0), empty, empty)

    r = allocate_ratios(thumb, region_map, n, ratio=ratio, allocation=allocation, tau=tau)
    s = holistic_scores(crop_scores, global_scores, crop_valid, scoring=scoring, alpha=alpha)
    if mode == "reference":
        # uniform keeps exactly int(N_j * R): a float32 copy of R loses a token where N_j * R is an integer.
        r_exact = torch.full_like(r, ratio, dtype=torch.float64) if allocation == "uniform" else r.double()
        k = (num_valid.double() * r_exact).floor().long()
    else:
        k = split_budget(total, r.double() * num_valid, num_valid)
    keep = topk_mask(s, k, crop_valid)
    return Selection(thumbnail_keep, order, keep, r, k, num_valid)
