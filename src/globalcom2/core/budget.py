"""The one count function of budget mode, and the budget split over crops (paper Eq. 4 weights).

Budget mode (the default) makes the number of kept visual tokens a function of the image geometry and R only, so a
processor can emit exactly that many placeholders before any forward. For a thumbnail of N tokens and crops with
N_j valid tokens each:

    thumbnail keeps int(N * R);  the crops keep K = int(R * sum_j N_j) in total

(``int(R * (h*w))``, the integer sum first: ``R * h * w`` rounds differently, e.g. 0.57 * 62 * 150 -> 5300 but
0.57 * 9300 -> 5301). K is split over crops by the adaptive weights r_j * N_j (:func:`split_budget`). Every family
adds its own layout tokens (e.g. a newline per row) on top; every processor patch, plan, baseline and the vLLM
plugin call :func:`budget_counts` for the two numbers above.

**Token budget per image** (``max_image_tokens=T`` instead of R). An image of N thumbnail tokens, S = sum_j N_j
crop tokens and ``overhead`` layout tokens that do not depend on R (newlines, family markers) gets its own ratio

    R(N, S, T) = the largest float64 R in (0, 1] with  overhead + int(N * R) + int(R * S) <= T

(:func:`ratio_for_max_tokens`), found by bisection on the bit patterns of positive float64 values with
:func:`budget_counts` itself as the test, so it equals, bit for bit on every machine, the ratio whose counts every
other caller of :func:`budget_counts` then computes; no closed form that could round differently is used. An image
whose full count fits gets R = 1 (left whole). Every step of Eq. 2-6 then runs unchanged at that R.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

import torch

_ONE_BITS = struct.unpack("<q", struct.pack("<d", 1.0))[0]


def _from_bits(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def budget_counts(num_thumbnail_tokens: int, num_crop_tokens: int, ratio: float) -> tuple[int, int]:
    """Budget mode's kept-token counts ``(int(N * R), int(R * sum_j N_j))`` (module docstring).

    Args:
        num_thumbnail_tokens: N, tokens of the thumbnail (global view).
        num_crop_tokens: sum_j N_j, valid tokens of all crops together (0 when there are none).
        ratio: R.
    """
    return int(num_thumbnail_tokens * ratio), int(ratio * num_crop_tokens)


def largest_fitting_ratio(count: Callable[[float], int], max_tokens: int) -> float:
    """The largest float64 R in (0, 1] with ``count(R) <= max_tokens``, for a count that never falls as R grows.

    Bisection on the bit patterns of positive float64 values (their order is the values' order): 63 steps at most,
    each one exact call of ``count``, so the result is the same on every machine.

    Args:
        count: tokens kept at ratio R; non-decreasing in R.
        max_tokens: the budget T.

    Returns:
        1.0 when ``count(1.0) <= max_tokens``, else the largest R whose count fits.

    Raises:
        ValueError: even the smallest positive R does not fit (the message names that minimum count).
    """
    if count(1.0) <= max_tokens:
        return 1.0
    lo, hi = 1, _ONE_BITS  # the smallest positive float64 and 1.0
    floor = count(_from_bits(lo))
    if floor > max_tokens:
        raise ValueError(
            f"max_image_tokens={max_tokens} is too small for this image: even the smallest retention ratio "
            f"gives it {floor} tokens, so use max_image_tokens >= {floor}"
        )
    while hi - lo > 1:  # invariant: count(lo) fits, count(hi) does not
        mid = (lo + hi) // 2
        if count(_from_bits(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return _from_bits(lo)


@functools.lru_cache(maxsize=4096)
def ratio_for_max_tokens(
    num_thumbnail_tokens: int, num_crop_tokens: int, max_tokens: int, overhead: int = 0
) -> float:
    """Per-image retention ratio under a token budget T (module docstring; paper Eq. 2-6 then run at this R).

    The largest float64 R in (0, 1] with ``overhead + sum(budget_counts(N, S, R)) <= T``: the most tokens of the
    image that fit, split between thumbnail and crops as the ratio mode splits them. R = 1 when the uncompressed
    image fits. The count then reaches T exactly unless both terms step up at the same R (e.g. S a multiple of N),
    where it can stay one short.

    Args:
        num_thumbnail_tokens: N, tokens of the thumbnail (global view).
        num_crop_tokens: S = sum_j N_j, valid tokens of all crops together (0 when there are none).
        max_tokens: T, the image's budget, layout tokens included.
        overhead: the image's layout tokens (newlines, markers), which do not depend on R.

    Raises:
        ValueError: ``overhead > T`` (not even an image without visual tokens fits).
    """
    return largest_fitting_ratio(
        lambda r: overhead + sum(budget_counts(num_thumbnail_tokens, num_crop_tokens, r)), max_tokens
    )


def split_budget(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split ``total`` tokens over crops in proportion to ``weights``, at most ``capacity`` each.

    Water-filling on the real line (a_j = min(capacity_j, lam * w_j) with sum a_j = total), then largest
    remainders to reach integers. Fixed number of tensor passes (<= number of crops); no ``.item()``.

    Args:
        total: tokens to hand out, ``0 <= total <= capacity.sum()``.
        weights: ``(n,)`` non-negative weights (r_j * N_j).
        capacity: ``(n,)`` Long, N_j.

    Returns:
        ``(n,)`` Long counts summing to ``total``.
    """
    w = weights.double().clamp_min(0) * (capacity > 0)
    cap = capacity.double()
    # Crops with room but zero weight only receive tokens once every weighted crop is full.
    w = torch.where(w.sum() > 0, w, cap)
    capped = torch.zeros_like(w, dtype=torch.bool)
    alloc = torch.zeros_like(w)
    for _ in range(w.numel()):
        free_w = (w * ~capped).sum()
        lam = (total - (cap * capped).sum()) / free_w.clamp_min(1e-300)
        alloc = torch.where(capped, cap, lam * w)
        newly = (alloc > cap) & ~capped
        capped = capped | newly
        alloc = alloc.clamp(max=cap)
    # Once every weighted crop is full, what is left goes to the zero-weight crops with room, by capacity
    # (rest is 0 unless that happens; it never exceeds their capacity because total <= capacity.sum()).
    zero_room = (w == 0) & (cap > 0)
    rest = (total - alloc.sum()).clamp_min(0)
    alloc = torch.where(zero_room, rest / (cap * zero_room).sum().clamp_min(1e-300) * cap, alloc)
    counts = alloc.floor().long()
    left = total - counts.sum()
    frac = torch.where(counts < capacity, alloc - counts, torch.full_like(alloc, -1.0))
    order = torch.sort(frac, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = counts + ((rank < left) & (counts < capacity)).long()
    return counts
