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

from .ranking import descending_rank

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


_GRID_BITS = 51  # weights as integers below 2^51: sums of up to 1024 stay below 2^61
_LIMB = 32
_MASK = (1 << _LIMB) - 1


def _integer_weights(w: torch.Tensor) -> torch.Tensor:
    """Weights as int64 on the grid ``max(w) * 2^-51`` (a power-of-two scaling, so exact for every weight that is a
    multiple of that grid: always for r_j * N_j with float32 r_j >= 2^-17 and N_j <= 1024; finer bits are cut)."""
    _, exponent = torch.frexp(w.amax(dim=-1, keepdim=True))
    return torch.ldexp(w, (_GRID_BITS - exponent).to(w.dtype)).floor().long()


def _limbs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x >> 32, x & (2^32 - 1))``: the high and low 32-bit limbs of a non-negative int64."""
    return x >> _LIMB, x & _MASK


def _exceeds(
    a: torch.Tensor, x: tuple[torch.Tensor, torch.Tensor], b: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``a * x > b * y`` exactly, for ``0 <= a, b < 2^31`` and ``0 <= x, y < 2^62`` (``x`` given as its limbs).

    With ``d1 = a*x_hi - b*y_hi`` and ``d0 = a*x_lo - b*y_lo`` (each term below 2^63, so no int64 overflow),
    ``a*x - b*y = d1 * 2^32 + d0``, which is positive iff ``d1 > floor(-d0 / 2^32)`` (an arithmetic shift).
    """
    y_hi, y_lo = _limbs(y)
    return a * x[0] - b * y_hi > (b * y_lo - a * x[1]) >> _LIMB


def split_budget(total: int | torch.Tensor, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split ``total`` tokens over crops in proportion to ``weights``, at most ``capacity`` each, exactly.

    Water-filling on the real line (a_j = min(capacity_j, lam * w_j) with sum a_j = total; crops with room but zero
    weight share what is left by capacity once every weighted crop is full), then floors, and the remaining tokens to
    the largest fractional parts among crops with room, the lower crop index first on equal parts.

    Every decision is taken in exact integer arithmetic: the weights become int64 on a power-of-two grid
    (:func:`_integer_weights`), sums are integer sums (no float reduction whose rounding depends on the machine's
    summation order), each comparison ``left * w_j > cap_j * sum_free w`` is made on 32-bit limbs
    (:func:`_exceeds`), and the fractional parts are compared as exact remainders over a common denominator. So the
    counts equal the rational computation on every machine and device. Vectorised: a fixed number of tensor passes
    (<= number of crops), no host synchronisation; leading dimensions are independent splits (e.g. the images of a
    batch). A single crop takes the whole total (what the general path computes for it, without its ~100 small
    tensor operations: the selection of a one-region image spends most of its time in such operations).

    Args:
        total: tokens to hand out, ``0 <= total <= capacity.sum(-1)``, < 2^31; an int or a tensor of the leading
            shape.
        weights: ``(..., n)`` non-negative weights (r_j * N_j); n <= 1024.
        capacity: ``(..., n)`` Long, N_j < 2^31.

    Returns:
        ``(..., n)`` Long counts summing to ``total``.
    """
    cap = capacity.long()
    tot = torch.as_tensor(total, dtype=torch.long, device=cap.device).expand(cap.shape[:-1]).unsqueeze(-1)
    if cap.shape[-1] == 1:
        return tot.clamp(min=0).minimum(cap)
    w = _integer_weights(weights.double().clamp_min(0)) * (cap > 0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, cap)  # no weight at all: split by capacity
    w_limbs = _limbs(w)
    capped = torch.zeros_like(cap, dtype=torch.bool)

    def free_and_left(capped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        free = torch.where(capped, 0, w).sum(-1, keepdim=True)
        return free, (tot - torch.where(capped, cap, 0).sum(-1, keepdim=True)).clamp_min(0)

    # A crop is capped once lam * w_j > cap_j. Each round caps at least one more crop until none changes, and at
    # most n - 1 crops are ever capped: zero-weight crops never are, and with all n weighted the last uncapped one
    # would need total > sum_j cap_j. So n - 1 rounds reach the fixed point.
    for _ in range(cap.shape[-1] - 1):
        free, left = free_and_left(capped)
        capped = capped | _exceeds(left, w_limbs, cap, free)
    free, left = free_and_left(capped)
    # Uncapped weighted crops: floor(left * w_j / free) and its exact remainder (denominator free). The float
    # estimate is within one of the floor; the remainder, exact on limbs, corrects it.
    den = free.clamp_min(1)
    q = torch.minimum((left.double() * w.double() / den.double()).floor().long().clamp(min=0), cap)
    # rem = left*w - q*den = e1 * 2^32 + e0 (no term overflows int64); carrying e0's high part into e1 keeps the
    # recombination below 2^63, since |rem| <= 2 * den < 2^62.
    den_hi, den_lo = _limbs(den)
    e0 = left * w_limbs[1] - q * den_lo
    rem = (left * w_limbs[0] - q * den_hi + (e0 >> _LIMB)) * (1 << _LIMB) + (e0 & _MASK)
    low = rem < 0
    q, rem = torch.where(low, q - 1, q), torch.where(low, rem + den, rem)
    high = rem >= den
    q, rem = torch.where(high, q + 1, q), torch.where(high, rem - den, rem)
    # Zero-weight crops with room share what is left once no weighted crop has room (free == 0), by capacity.
    room = (w == 0) & (cap > 0) & (free == 0)
    room_den = torch.where(room, cap, 0).sum(-1, keepdim=True).clamp_min(1)
    share = left * cap
    weighted = free > 0
    counts = torch.where(capped, cap, torch.where(room, share // room_den, torch.where(weighted, q, 0)))
    key = torch.where(room, share % room_den, torch.where(weighted, rem, 0))
    key = torch.where(capped | (counts >= cap), -1, key)  # only crops with room may take one more
    short = tot - counts.sum(-1, keepdim=True)
    return counts + ((descending_rank(key) < short) & (key >= 0)).long()
