"""One vectorised selection for all images of a batch: each image gets exactly what it gets alone.

Images of one batch differ in crop count (a lone tile has none), crop table width, valid cells and R (under
``max_image_tokens`` every image has its own); the batch pads them to the largest. Nothing of an image may depend
on its neighbours or on the padding: every field of its :class:`Selection` must be equal bit for bit.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from globalcom2.core import CropLayout, thumbnail_region_map
from globalcom2.core.select import SelectionInput, select_batch, select_images, select_tokens
from globalcom2.core.sums import exact_segment_sum, exact_sum

G = 6  # thumbnail 6 x 6
FIELDS = (
    "thumbnail_keep",
    "thumbnail_order",
    "crop_keep",
    "crop_ratios",
    "crop_keep_counts",
    "crop_valid_counts",
)


def _image(rng: random.Random, seed: int, ties: bool = False) -> SelectionInput:
    """A random tiled image: a grid of up to 2 x 3 crops (or none), uneven blocks with padding, its own R."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = rng.choice([(0, 0), (1, 2), (2, 1), (2, 2), (1, 3), (2, 3)])
    ratio = rng.choice([0.1, 0.25, 0.3, 0.5, 0.57, 1.0, 0.123456789])

    def draw(*shape: int) -> torch.Tensor:
        x = torch.rand(*shape, generator=gen)
        return (x * 4).floor() / 4 if ties else x  # ties: only four distinct values

    thumb = draw(G * G)
    if rows == 0:
        empty = torch.zeros(0, G * G)
        return SelectionInput(thumb, empty.double(), empty.bool(), empty.double(),
                              torch.zeros(G * G, dtype=torch.long), ratio, 0)  # fmt: skip
    # Each crop row/column gets 1..G tokens: uneven blocks, so the table has invalid cells.
    heights = [rng.randint(1, G) for _ in range(rows)]
    widths = [rng.randint(1, G) for _ in range(cols)]
    row_block = torch.repeat_interleave(torch.arange(rows), torch.tensor(heights))
    col_block = torch.repeat_interleave(torch.arange(cols), torch.tensor(widths))
    layout = CropLayout.from_blocks(row_block, col_block, (rows, cols))
    shape = layout.shape
    local, global_ = draw(*shape).double(), draw(*shape).double()
    known = shape[0] * shape[1] if rng.random() < 0.5 else None  # some callers let the core count
    return SelectionInput(
        thumb, layout.to_table(local), layout.valid(), layout.to_table(global_),
        thumbnail_region_map(G, rows, cols), ratio, known,
    )  # fmt: skip


def _alone(x: SelectionInput, **options):
    return select_tokens(
        x.thumbnail_scores, x.crop_scores, x.crop_valid, x.global_scores, x.region_map, ratio=x.ratio,
        num_crop_tokens=x.num_crop_tokens, **options,
    )  # fmt: skip


def _assert_same(a, b, where: str) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{where}: {name} differs"


@pytest.mark.parametrize("mode", ["budget", "reference"])
@pytest.mark.parametrize("allocation", ["softmax-sum", "softmax-max", "topk-count", "uniform"])
@pytest.mark.parametrize("scoring", ["holistic", "local", "global"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_every_image_of_a_batch_gets_what_it_gets_alone(mode, allocation, scoring, ties):
    rng = random.Random(hash((mode, allocation, scoring, ties)) % 1000)
    images = [_image(rng, seed=k, ties=ties) for k in range(7)]
    options = {"mode": mode, "allocation": allocation, "scoring": scoring}
    alone = [_alone(x, **options) for x in images]
    together = select_images(images, **options)
    for k, (a, b) in enumerate(zip(alone, together, strict=True)):
        _assert_same(a, b, f"image {k}")
    # ... in any order and beside any neighbours (other padding).
    reordered = select_images(images[::-1][:4], **options)
    for k, b in enumerate(reordered):
        _assert_same(alone[len(images) - 1 - k], b, f"reversed image {k}")


def test_a_batch_of_thumbnail_only_images_has_no_crops():
    rng = random.Random(3)
    lone = [x for x in (_image(rng, seed=k) for k in range(30)) if x.crop_scores.shape[0] == 0][:3]
    assert len(lone) >= 2
    for x, got in zip(lone, select_images(lone), strict=True):
        _assert_same(_alone(x), got, "thumbnail only")
        assert got.crop_keep.shape == (0, G * G) and int(got.thumbnail_keep.sum()) == int(G * G * x.ratio)


def test_select_batch_keeps_the_budget_counts_per_image():
    """Budget mode: the crops of image b keep int(R_b * sum_j N_j) tokens and its thumbnail int(N * R_b)."""
    rng = random.Random(11)
    images = [_image(rng, seed=k) for k in range(9)]
    for x, sel in zip(images, select_images(images), strict=True):
        total = int(x.crop_valid.sum())
        assert int(sel.crop_keep.sum()) == int(x.ratio * total) == int(sel.crop_keep_counts.sum())
        assert int(sel.thumbnail_keep.sum()) == int(G * G * x.ratio) == sel.thumbnail_order.numel()
        assert bool((sel.crop_keep <= x.crop_valid).all())


def test_select_batch_rejects_unknown_modes():
    rng = random.Random(5)
    a = _image(rng, seed=1)
    with pytest.raises(ValueError, match="mode"):
        select_batch(a.thumbnail_scores[None], a.crop_scores[None], a.crop_valid[None], a.global_scores[None],
                     a.region_map[None], ratios=[0.25], num_crops=[a.crop_scores.shape[0]], mode="fast")  # fmt: skip


def test_sums_are_order_free_whatever_the_padding():
    """Every sum of the selection is exact on an integer grid: here the float32 order decides a plain sum's result
    (left to right 1, pairwise 0), the grid sum is the true 2 in every order and beside any padding."""
    x = torch.tensor([[1e8, 1.0, -1e8, 1.0]], dtype=torch.float32)
    assert exact_sum(x).item() == 2.0
    assert exact_sum(x[:, [2, 0, 3, 1]]).item() == 2.0
    assert exact_sum(torch.cat([x, torch.zeros(1, 5)], dim=1)).item() == 2.0
    assert exact_sum(torch.zeros(3, 0)).tolist() == [[0.0]] * 3
    # Region sums (Eq. 2) of [CLS]-like scores: equal bits for every order of the tokens, and within one float32
    # rounding of the exact rational sum.
    gen = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(2, 576, generator=gen) * 3, -1)
    regions = torch.randint(0, 5, (2, 576), generator=gen)
    got = exact_segment_sum(scores, regions, 5)
    perm = torch.randperm(576, generator=gen)
    assert torch.equal(got, exact_segment_sum(scores[:, perm], regions[:, perm], 5))
    for b in range(2):
        for j in range(5):
            exact = sum(Fraction(float(v)) for v in scores[b][regions[b] == j])
            assert abs(Fraction(float(got[b, j])) - exact) <= Fraction(float(got[b, j])) * Fraction(1, 2**23)
