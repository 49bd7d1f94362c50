"""PruMerge's rule written plainly from the paper (Sec. 3.2-3.3, Algorithm 1): Python loops, ``numpy.percentile``
quartiles, token-by-token merge. Shared by the LLaVA-NeXT, InternVL and Llama 4 tests."""

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


def shuffle_groups(p: int, factor: int) -> list[list[int]]:
    """The patches (raster indices of the ``p x p`` grid) of every pixel-shuffle group, in raster order."""
    m = p // factor
    return [
        [(gy * factor + dy) * p + gx * factor + dx for dy in range(factor) for dx in range(factor)]
        for gy in range(m)
        for gx in range(m)
    ]


def plain_shuffled_tiles(
    attention, keys, y, factor: int, plus: bool, k: int = 32
) -> list[tuple[set[int], int, list]]:
    """The rule on each tile of a pixel-shuffled grid (InternVL, Llama 4): a token's attention is the sum over its
    group's patches, its key the group's keys side by side. ``attention`` ``(T, P)``, ``keys`` ``(T, P, D)`` per
    patch, ``y`` ``(T, P / factor**2, C)`` per token. Returns per tile ``(kept tokens, IQR outliers or 1, rows)``,
    the rows the tile hands on: its merged kept tokens in raster order, then its remainder (if it pruned any)."""
    groups = shuffle_groups(int(round(attention.shape[1] ** 0.5)), factor)
    tiles = []
    for t in range(attention.shape[0]):
        a = torch.tensor([float(sum(attention[t, i] for i in grp)) for grp in groups], dtype=torch.float64)
        key = torch.stack([torch.cat([keys[t, i] for i in grp]) for grp in groups])
        valid = list(range(len(groups)))
        keep, num_out = plain_keep(a, valid, plus)
        merged, extra = plain_merge(a, key, y[t], valid, keep, k)
        tiles.append(
            (keep, num_out, [merged[i] for i in sorted(keep)] + ([extra] if len(keep) < len(valid) else []))
        )
    return tiles
