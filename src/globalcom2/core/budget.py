"""The one count function of budget mode, and the budget split over crops (paper Eq. 4 weights).

Budget mode (the default) makes the number of kept visual tokens a function of the image geometry and R only, so a
processor can emit exactly that many placeholders before any forward. For a thumbnail of N tokens and crops with
N_j valid tokens each:

    thumbnail keeps int(N * R);  the crops keep K = int(R * sum_j N_j) in total

(``int(R * (h*w))``, the integer sum first: ``R * h * w`` rounds differently, e.g. 0.57 * 62 * 150 -> 5300 but
0.57 * 9300 -> 5301). K is split over crops by the adaptive weights r_j * N_j (:func:`split_budget`). Every family
adds its own layout tokens (e.g. a newline per row) on top; every processor patch, plan, baseline and the vLLM
plugin call :func:`budget_counts` for the two numbers above.
"""

from __future__ import annotations

import torch


def budget_counts(num_thumbnail_tokens: int, num_crop_tokens: int, ratio: float) -> tuple[int, int]:
    """Budget mode's kept-token counts ``(int(N * R), int(R * sum_j N_j))`` (module docstring).

    Args:
        num_thumbnail_tokens: N, tokens of the thumbnail (global view).
        num_crop_tokens: sum_j N_j, valid tokens of all crops together (0 when there are none).
        ratio: R.
    """
    return int(num_thumbnail_tokens * ratio), int(ratio * num_crop_tokens)


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
