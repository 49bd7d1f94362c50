"""mode="reference" == an independent plain re-implementation of DESIGN.md §3, mask for mask."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from globalcom2.core import plan_image
from tests.core.reference_plain import plain_reference

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


@pytest.mark.parametrize("kind", ["logits", "softmax"])
@pytest.mark.parametrize("size", list(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_masks_match_plain(size, kind):
    grid = SIZES[size]
    n = grid[0] * grid[1]
    thumb, crops = _scores(zlib.crc32(f"{size}{kind}".encode()), n, kind)
    for ratio in RATIOS:
        for allocation in ALLOCATIONS:
            for scoring in SCORINGS:
                plan, index = plan_image(
                    thumb, crops, grid=grid, image_size=size, ratio=ratio, mode="reference",
                    allocation=allocation, scoring=scoring,
                )  # fmt: skip
                t_mask, c_mask, r, t_order, counts = plain_reference(
                    thumb.numpy(), crops.numpy(), grid, size, ratio, allocation, scoring
                )
                where = f"{size} R={ratio} {allocation} {scoring} {kind}"
                assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask), where
                assert np.array_equal(plan.crops_mask.numpy(), c_mask), where
                np.testing.assert_allclose(plan.crop_ratios.numpy(), r, rtol=1e-6, err_msg=where)
                assert plan.thumbnail_order.tolist() == t_order, where
                assert plan.crop_keep_counts.tolist() == counts, where
                # LLM-side count: int(N*R) + sum_j int(N_j*r_j) + rows*g newlines (DESIGN.md §3.8).
                assert plan.num_tokens == int(G * G * ratio) + sum(counts) + grid[0] * G == index.numel(), (
                    where
                )


def test_reference_emission_order_is_packed_slots():
    """A padded crop's kept tokens are written at slot v = their index in the crop's valid-token list."""
    size, grid = (300, 1200), (1, 3)  # wide: rows at top and bottom are padding
    thumb, crops = _scores(7, 3, "logits")
    plan, index = plan_image(thumb, crops, grid=grid, image_size=size, ratio=0.25, mode="reference")
    top, bottom, left, right = plan.valid_box
    assert top > 0  # the test needs padding
    gg = G * G
    expected = [int(i) for i in plan.thumbnail_order]
    # Build the slot grid plainly, crop by crop.
    slot_grid = -np.ones((grid[0] * G, grid[1] * G), dtype=np.int64)
    for j in range(3):
        c0 = j * G
        valid_positions = [
            (y, x) for y in range(top, bottom) for x in range(max(left, c0), min(right, c0 + G))
        ]
        for v, (y, x) in enumerate(valid_positions):
            if plan.crops_mask[y, x]:
                slot_grid[v // G, c0 + v % G] = (1 + j) * gg + (y * G + (x - c0))
    for row in slot_grid:
        expected += [int(v) for v in row if v >= 0]
        expected.append(4 * gg)  # newline after every padded row
    assert index.tolist() == expected


@pytest.mark.parametrize("size", [(72, 18), (72, 2), (19, 48), (30, 72), (48, 37)])
def test_global_submaps_match_written_out_bilinear(size):
    """The sub-maps (placed on the valid box, cut into tiles) equal a written-out bilinear resize to 1 ulp."""
    from globalcom2.core.geometry import global_submaps, tiles_to_grid
    from tests.core.reference_plain import bilinear

    rows, cols = 4, 4
    h, w = size
    box = (1, 1 + h, 2, 2 + w)
    thumb = torch.randn(G * G, generator=torch.Generator().manual_seed(h * w))
    grid = tiles_to_grid(global_submaps(thumb, rows, cols, box), rows, cols).numpy()
    expected = bilinear(thumb.numpy().reshape(G, G), h, w)
    np.testing.assert_allclose(grid[1 : 1 + h, 2 : 2 + w], expected, rtol=0, atol=2e-6)
    assert not grid[0].any() and not grid[:, :2].any()  # zero outside the valid box
