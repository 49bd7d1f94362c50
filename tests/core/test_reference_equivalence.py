"""The anyres pipeline (LLaVA-NeXT geometry) == an independent plain re-implementation, mask for mask.

Reference mode follows the official implementation step by step; budget mode's split is checked against an exact
re-implementation in rational arithmetic. The plain code imports nothing from globalcom2.
"""

from __future__ import annotations

import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from globalcom2 import GlobalComConfig
from globalcom2.adapters.anyres import AnyresGeometry, plan_anyres, valid_box
from tests.core.reference_plain import plain_reference, plain_sequence

G = 24  # CLIP ViT-L/14-336 grid
# (height, width) -> grid chosen by LLaVA-NeXT's CLIP-336 pinpoints; wide, tall, square, extreme aspect.
SIZES = {
    (480, 640): (1, 2),
    (640, 480): (2, 1),
    (1000, 1000): (2, 2),
    (336, 336): (2, 2),
    (300, 1200): (1, 3),
    (1200, 300): (3, 1),
    (77, 1003): (1, 3),
    (1003, 77): (3, 1),
    (1080, 1920): (1, 2),
    (1920, 1080): (2, 1),
    (500, 530): (2, 2),
    (200, 900): (1, 3),
}
RATIOS = (0.5, 0.25, 0.1)
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")
SCORINGS = ("holistic", "local", "global")


def _scores(seed: int, n: int, kind: str):
    gen = torch.Generator().manual_seed(seed)
    # Logits-like scores with a few very bright "artifact" tokens, as real ViTs have.
    t = torch.randn(G * G, generator=gen) * 2
    c = torch.randn(n, G * G, generator=gen) * 2
    t[torch.randint(0, G * G, (3,), generator=gen)] += 25
    if kind == "softmax":
        t, c = t.softmax(-1), c.softmax(-1)
    return t, c


def _geometry(size, grid) -> AnyresGeometry:
    box = valid_box(size[0], size[1], grid[0] * G, grid[1] * G)
    return AnyresGeometry(grid, G, box, (box[1] - box[0], box[3] - box[2]))


def _plan(thumb, crops, size, grid, **options):
    return plan_anyres(torch.cat([thumb[None], crops]), _geometry(size, grid), GlobalComConfig(**options),
                       official_order=True)  # fmt: skip


@pytest.mark.parametrize("kind", ["logits", "softmax"])
@pytest.mark.parametrize("size", list(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_masks_and_order_match_plain(size, kind):
    grid = SIZES[size]
    n = grid[0] * grid[1]
    thumb, crops = _scores(zlib.crc32(f"{size}{kind}".encode()), n, kind)
    for ratio in RATIOS:
        for allocation in ALLOCATIONS:
            for scoring in SCORINGS:
                plan, index = _plan(thumb, crops, size, grid, ratio=ratio, mode="reference",
                                    allocation=allocation, scoring=scoring)  # fmt: skip
                t_mask, c_mask, r, t_order, counts = plain_reference(
                    thumb.numpy(), crops.numpy(), grid, size, ratio, allocation, scoring
                )
                where = f"{size} R={ratio} {allocation} {scoring} {kind}"
                assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask), where
                assert np.array_equal(plan.crops_mask.numpy(), c_mask), where
                np.testing.assert_allclose(plan.crop_ratios.numpy(), r, rtol=1e-6, err_msg=where)
                assert plan.thumbnail_order.tolist() == t_order, where
                assert plan.crop_keep_counts.tolist() == counts, where
                # LLM-side count: int(N*R) + sum_j int(N_j*r_j) + rows*g newlines.
                assert plan.num_tokens == int(G * G * ratio) + sum(counts) + grid[0] * G == index.numel(), (
                    where
                )
                assert index.tolist() == plain_sequence(
                    t_order, c_mask, grid, plan.valid_box, G, "reference"
                ), where


def exact_split(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """The documented budget split in exact rational arithmetic, written plainly.

    Water-filling: a_j = min(N_j, lam * w_j) with sum a_j = total (crops with room but zero weight share what is
    left by capacity once every weighted crop is full); then floors, and the remaining tokens to the largest
    fractional parts among crops with room, lower crop index first on equal parts.
    """
    w = [Fraction(x) if c > 0 else Fraction(0) for x, c in zip(weights, capacity, strict=True)]
    if sum(w) == 0:
        w = [Fraction(c) for c in capacity]
    capped: set[int] = set()
    while True:
        free = sum(w[j] for j in range(len(w)) if j not in capped)
        left = total - sum(capacity[j] for j in capped)
        lam = Fraction(left) / free if free else Fraction(0)
        over = {j for j in range(len(w)) if j not in capped and lam * w[j] > capacity[j]}
        if not over:
            break
        capped |= over
    alloc = [Fraction(capacity[j]) if j in capped else lam * w[j] for j in range(len(w))]
    rest = total - sum(alloc)
    room = [j for j in range(len(w)) if w[j] == 0 and capacity[j] > 0]
    if rest > 0 and room:
        cap_room = sum(capacity[j] for j in room)
        for j in room:
            alloc[j] = rest * capacity[j] / cap_room
    counts = [int(a) for a in alloc]  # floor (non-negative)
    short = total - sum(counts)
    order = sorted(
        (j for j in range(len(w)) if counts[j] < capacity[j]), key=lambda j: (-(alloc[j] - counts[j]), j)
    )
    for j in order[:short]:
        counts[j] += 1
    return counts


@pytest.mark.parametrize("size", list(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_budget_split_matches_exact_plain_split(size):
    """Budget mode: the per-crop counts equal an exact split of K = int(R * sum N_j) by the plain r_j * N_j."""
    grid = SIZES[size]
    n = grid[0] * grid[1]
    thumb, crops = _scores(zlib.crc32(f"budget{size}".encode()), n, "logits")
    for ratio in RATIOS:
        for allocation in ALLOCATIONS:
            plan, index = _plan(thumb, crops, size, grid, ratio=ratio, allocation=allocation)
            _, _, r, _, _ = plain_reference(
                thumb.numpy(), crops.numpy(), grid, size, ratio, allocation, "local"
            )
            top, bottom, left, right = plan.valid_box
            n_j = [
                max(0, min(bottom, (cr + 1) * G) - max(top, cr * G))
                * max(0, min(right, (cc + 1) * G) - max(left, cc * G))
                for cr in range(grid[0])
                for cc in range(grid[1])
            ]
            total = int(ratio * sum(n_j))
            expected = exact_split(total, [float(rj) * nj for rj, nj in zip(r, n_j, strict=True)], n_j)
            where = f"{size} R={ratio} {allocation}"
            assert plan.crop_valid_counts.tolist() == n_j, where
            assert plan.crop_keep_counts.tolist() == expected, where
            assert plan.num_tokens == int(G * G * ratio) + total + (bottom - top) == index.numel(), where


@pytest.mark.parametrize("size", [(300, 1200), (1200, 300), (500, 530)], ids=str)
def test_budget_sequence_is_raster_order_with_a_newline_per_valid_row(size):
    grid = SIZES[size]
    thumb, crops = _scores(5, grid[0] * grid[1], "logits")
    plan, index = _plan(thumb, crops, size, grid, ratio=0.25)
    assert index.tolist() == plain_sequence(
        plan.thumbnail_order.tolist(), plan.crops_mask.numpy(), grid, plan.valid_box, G, "budget"
    )
    assert plan.thumbnail_order.tolist() == sorted(plan.thumbnail_order.tolist())
