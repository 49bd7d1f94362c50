"""Token counts: the uncompressed LLaVA-NeXT count, the budget-mode count, and the budget split over crops.

Budget mode (our default) makes the number of visual tokens a function of the image size and R only, so the
processor can emit exactly that many ``<image>`` placeholders before any forward:

    num_tokens = int(N * R) + int(R * sum_j N_j) + valid_rows

N = g*g thumbnail tokens, N_j the unpadded tokens of crop j, valid_rows the unpadded rows of the crop grid (one
newline token each). The crop total K = int(R * sum_j N_j) is split over crops by the adaptive weights r_j * N_j
(paper Eq. 4) with largest remainders, capped at N_j.
"""

from __future__ import annotations

import torch

from .geometry import valid_box


def full_num_tokens(orig_height: int, orig_width: int, rows: int, cols: int, g: int) -> int:
    """Image tokens of an uncompressed LLaVA-NeXT image: thumbnail + unpadded crops + one newline per valid row."""
    top, bottom, left, right = valid_box(orig_height, orig_width, rows * g, cols * g)
    return g * g + (bottom - top) * (right - left) + (bottom - top)


def budget_num_tokens(orig_height: int, orig_width: int, rows: int, cols: int, g: int, ratio: float) -> int:
    """Image tokens handed to the LLM in budget mode (the formula in the module docstring)."""
    top, bottom, left, right = valid_box(orig_height, orig_width, rows * g, cols * g)
    # int(R * (h*w)), not int(R * h * w): the two round differently (0.57 * 62 * 150 -> 5300, 0.57 * 9300 -> 5301),
    # and the documented count is R times the integer sum of N_j.
    return int(g * g * ratio) + int(ratio * ((bottom - top) * (right - left))) + (bottom - top)


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
