"""A plain re-implementation of GlobalCom² on a native-resolution image, written from docs/qwen.md ("The rule").

Deliberately simple (Python loops, exact fractions for the budget split) and independent of the library: it imports
nothing from ``globalcom2``. The tests compare the library's kept sets, counts and LLM rows with it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F


def bands(n: int, g: int) -> list[tuple[int, int]]:
    """``ceil(n / g)`` bands, band i = rows floor(i*n/nb) .. floor((i+1)*n/nb) - 1."""
    nb = max(math.ceil(n / g), 1)
    bounds = [i * n // nb for i in range(nb + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(nb)]


def _band_of(row: int, spans: list[tuple[int, int]]) -> int:
    return next(i for i, (a, b) in enumerate(spans) if a <= row < b)


def _neg_cos(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(x, g.expand_as(x), dim=-1)


def _split(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Water-filling of ``total`` over weights (capped at caps), floors, then the largest remainders (lower index
    first on equal remainders) among regions with room; exact fractions."""
    w = [Fraction(v) for v in weights]
    capped: set[int] = set()
    while True:
        free = [j for j in range(len(w)) if j not in capped]
        total_w = sum((w[j] for j in free), Fraction(0))
        left = total - sum(caps[j] for j in capped)
        newly = {j for j in free if total_w > 0 and left * w[j] > caps[j] * total_w}
        if not newly:
            break
        capped |= newly
    free = [j for j in range(len(w)) if j not in capped]
    total_w = sum((w[j] for j in free), Fraction(0))
    left = total - sum(caps[j] for j in capped)
    counts = [caps[j] if j in capped else 0 for j in range(len(w))]
    remainders = {}
    for j in free:
        share = left * w[j] / total_w
        counts[j] = min(math.floor(share), caps[j])
        remainders[j] = share - math.floor(share)
    short = total - sum(counts)
    order = sorted((j for j in free if counts[j] < caps[j]), key=lambda j: (-remainders[j], j))
    for j in order[:short]:
        counts[j] += 1
    return counts


def plain_native(
    features: torch.Tensor,
    grid: tuple[int, int],
    g: int,
    ratio: float,
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Kept tokens of one image: ``(kept Bool (H, W), kept count per region row-major, r_j per region)``."""
    height, width = grid
    x = features.float().reshape(height, width, -1)
    dim = x.shape[-1]
    row_bands, col_bands = bands(height, g), bands(width, g)
    regions = [(rb, cb) for rb in row_bands for cb in col_bands]
    # 1. the virtual global view: pooled cells scored against the mean of every token
    ph, pw = min(g, height), min(g, width)
    mean_all = x.reshape(-1, dim).mean(0)
    cells = torch.zeros(ph, pw, dtype=torch.float64)
    cell_region = [[0] * pw for _ in range(ph)]
    for a in range(ph):
        r0, r1 = a * height // ph, -(-(a + 1) * height // ph)
        for b in range(pw):
            c0, c1 = b * width // pw, -(-(b + 1) * width // pw)
            cell = x[r0:r1, c0:c1].reshape(-1, dim).mean(0)
            cells[a, b] = float(_neg_cos(cell[None], mean_all)[0])
            centre_r, centre_c = (2 * a + 1) * height // (2 * ph), (2 * b + 1) * width // (2 * pw)
            cell_region[a][b] = _band_of(centre_r, row_bands) * len(col_bands) + _band_of(centre_c, col_bands)
    # 2. allocation (Eq. 2-4)
    n = len(regions)
    flat = [(float(cells[a, b]), cell_region[a][b]) for a in range(ph) for b in range(pw)]
    if allocation == "uniform":
        r = [ratio] * n
    else:
        if allocation == "topk-count":
            k = int(ph * pw * ratio)
            top = sorted(range(len(flat)), key=lambda i: (-flat[i][0], i))[:k]
            counts = [sum(1 for i in top if flat[i][1] == j) for j in range(n)]
            sigma = [c / max(sum(counts), 1) for c in counts]
        else:
            richness = []
            for j in range(n):
                values = [s for s, reg in flat if reg == j]
                richness.append(sum(values) if allocation == "softmax-sum" else max(values))
            top_s = max(richness)
            e = [math.exp((s - top_s) / tau) for s in richness]
            sigma = [v / (sum(e) + 1e-8) for v in e]
        mean_sigma = sum(sigma) / n
        r = [min(1.0, ratio * (1 + s - mean_sigma)) for s in sigma]
    # 3. budget and its split over the regions
    sizes = [(rb[1] - rb[0]) * (cb[1] - cb[0]) for rb, cb in regions]
    total = max(1, int(ratio * (height * width)))
    keep_counts = _split(total, [rj * nj for rj, nj in zip(r, sizes, strict=True)], sizes)
    # 4. holistic scores (Eq. 5) and the top k_j of every region (Eq. 6)
    global_map = F.interpolate(cells[None, None], size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ]
    kept = torch.zeros(height, width, dtype=torch.bool)
    for (rb, cb), k_j in zip(regions, keep_counts, strict=True):
        block = x[rb[0] : rb[1], cb[0] : cb[1]].reshape(-1, dim)
        local = _neg_cos(block, block.mean(0)).double()
        glob = global_map[rb[0] : rb[1], cb[0] : cb[1]].reshape(-1)
        local_n, glob_n = local / local.norm().clamp_min(1e-12), glob / glob.norm().clamp_min(1e-12)
        score = {"holistic": alpha * glob_n + (1 - alpha) * local_n, "local": local_n, "global": glob_n}[
            scoring
        ]
        order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))[:k_j]
        w = cb[1] - cb[0]
        for i in order:
            kept[rb[0] + i // w, cb[0] + i % w] = True
    return kept, keep_counts, r
