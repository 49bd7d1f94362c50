"""The core on its own: the deterministic resize, the tie rule, the crop table, the count function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from globalcom2.core import (
    CropLayout,
    bilinear_resize,
    budget_counts,
    descending_rank,
    select_tokens,
    thumbnail_region_map,
    top_indices,
)
from tests.core.reference_plain import bilinear64

SIZES = [(72, 18), (72, 2), (19, 48), (30, 72), (48, 37), (5, 5), (1, 9), (24, 24), (97, 13)]


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_bilinear_resize_is_the_written_out_formula_bit_for_bit(size):
    src = torch.randn(24, 24, generator=torch.Generator().manual_seed(size[0] * size[1])).float()
    got = bilinear_resize(src, size)
    assert got.dtype == torch.float64
    assert np.array_equal(got.numpy(), bilinear64(src.numpy(), *size))
    # ... and it is the bilinear F.interpolate computes, up to that kernel's float32 rounding.
    ref = F.interpolate(src[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)


def test_clamped_border_cells_are_exact_copies():
    """Upsampling: the outer cells sample past the last source cell and must equal it exactly (no rounding)."""
    src = torch.rand(3, 3, dtype=torch.float32) + 0.1
    out = bilinear_resize(src, (20, 20))
    assert torch.equal(out[0, 0], src[0, 0].double()) and torch.equal(out[-1, -1], src[-1, -1].double())
    assert torch.equal(out[-1, -1], out[-2, -1])  # both clamped onto the same source cell
    const = bilinear_resize(torch.full((4, 4), 0.3), (13, 7))
    assert bool((const == const[0, 0]).all())  # a constant map stays exactly constant


def test_tie_rule_earlier_index_wins():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 1.0])
    assert top_indices(scores, 2).tolist() == [1, 2]
    assert descending_rank(scores).tolist() == [4, 0, 1, 3, 2, 5]
    assert top_indices(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["budget", "reference"])
@pytest.mark.parametrize("scoring", ["holistic", "local", "global"])
def test_all_equal_scores_keep_the_first_tokens_in_raster_order(mode, scoring):
    g, grid = 6, (2, 3)
    layout = CropLayout.from_tiles(grid, g)
    valid = layout.valid()
    sel = select_tokens(
        torch.ones(g * g), torch.ones(6, g * g), valid, torch.ones(6, g * g, dtype=torch.float64),
        thumbnail_region_map(g, *grid), ratio=0.25, mode=mode, scoring=scoring,
    )  # fmt: skip
    k0 = int(g * g * 0.25)
    assert sel.thumbnail_order.tolist() == list(range(k0))
    for j in range(6):
        k = int(sel.crop_keep_counts[j])
        assert sel.crop_keep[j].nonzero().reshape(-1).tolist() == list(range(k)), j


def test_crop_layout_round_trip_and_valid_list_index():
    # A 5 x 7 grid in 2 x 3 crops of uneven blocks (rows 3+2, columns 2+3+2).
    row_block, col_block = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    layout = CropLayout.from_blocks(row_block, col_block, (2, 3))
    assert layout.width == 9
    values = torch.arange(35).reshape(5, 7)
    table = layout.to_table(values, -1)
    assert torch.equal(layout.from_table(table), values)
    assert table[1].tolist()[:9] == [2, 3, 4, 9, 10, 11, 16, 17, 18]  # crop (0, 1): its block in raster order
    assert table[5].tolist() == [26, 27, 33, 34] + [-1] * 5
    assert layout.valid().sum(-1).tolist() == [6, 9, 6, 4, 6, 4]


def test_select_without_crops_keeps_the_thumbnail_rule():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.0, 0.7, 0.3, 0.4])
    empty = torch.zeros(0, 9)
    kw = dict(ratio=0.4, allocation="softmax-sum")
    ref = select_tokens(scores, empty, empty.bool(), empty.double(), torch.zeros(9, dtype=torch.long),
                        mode="reference", **kw)  # fmt: skip
    bud = select_tokens(scores, empty, empty.bool(), empty.double(), torch.zeros(9, dtype=torch.long), **kw)
    assert ref.thumbnail_order.tolist() == [1, 3, 6]  # descending score, tie 1 vs 3 by index
    assert bud.thumbnail_order.tolist() == [1, 3, 6] and bud.thumbnail_keep.sum() == 3


def test_budget_counts_is_r_times_the_integer_sum():
    assert budget_counts(729, 62 * 150, 0.57) == (int(729 * 0.57), 5301)  # R * (h*w), not R * h * w (5300)
    assert budget_counts(576, 0, 0.1) == (57, 0)
