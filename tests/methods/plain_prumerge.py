"""PruMerge's rule written plainly from the paper (Sec. 3.2-3.3, Algorithm 1): Python loops, ``numpy.percentile``
quartiles, token-by-token merge. Shared by the LLaVA-NeXT and the InternVL tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def plain_keep(a: torch.Tensor, valid: list[int], plus: bool) -> tuple[set[int], int]:
    """Paper Sec. 3.2: IQR outliers (top token when none); PruMerge+: positions 0, s, 2s, ... < N - 1."""
    v = a[valid].numpy()
    q1, q3 = np.percentile(v, [25, 75])
    out = [i for i, s in zip(valid, v, strict=True) if s > q3 + 1.5 * (q3 - q1)]
    if not out:
        out = [valid[int(np.argmax(v))]]  # first maximum
    keep = set(out)
    if plus:
        step = max(1, (len(valid) // len(out)) // 3)
        keep |= {valid[p] for p in range(0, len(valid) - 1, step)}
    return keep, len(out)


def plain_merge(a, keys, y, valid: list[int], keep: set[int], k: int):
    """Algorithm 1 lines 4-8, token by token: y'_p = y_p + sum over its k key-nearest other tokens of a_q y_q."""
    merged = {}
    for p in sorted(keep):
        others = [q for q in valid if q != p]
        sim = {q: float(F.cosine_similarity(keys[p], keys[q], dim=0)) for q in others}
        nearest = sorted(others, key=lambda q: (-sim[q], q))[:k]
        merged[p] = y[p] + sum(a[q] * y[q] for q in nearest)
    extra = sum((a[q] * y[q] for q in valid if q not in keep), torch.zeros_like(y[0]))
    return merged, extra
