"""The native-resolution geometry (core.regions): regions, the pooled global view, and batches of mixed sizes."""

from __future__ import annotations

import pytest
import torch

from globalcom2.core.regions import native_num_tokens, native_selection_input, pooled_shape, region_layout
from globalcom2.core.select import select_images

GRIDS = ((5, 5), (7, 38), (13, 22), (25, 11), (19, 19), (8, 23), (37, 37))


def _features(grid: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(grid[0] * grid[1], 24, generator=gen)


@pytest.mark.parametrize("allocation", ["softmax-sum", "softmax-max", "topk-count", "uniform"])
@pytest.mark.parametrize("scoring", ["holistic", "local", "global"])
def test_images_of_mixed_sizes_get_in_a_batch_what_they_get_alone(allocation, scoring):
    """Global views of different sizes are padded in one batch: padding never ranks, never lies in a region."""
    options = {"allocation": allocation, "scoring": scoring}
    inputs = [native_selection_input(_features(g, k), g, 16, 0.25)[0] for k, g in enumerate(GRIDS)]
    together = select_images(inputs, **options)
    for x, sel in zip(inputs, together, strict=True):
        (alone,) = select_images([x], **options)
        assert alone.thumbnail_keep.shape == sel.thumbnail_keep.shape == x.thumbnail_scores.shape
        for name in ("thumbnail_keep", "crop_keep", "crop_keep_counts", "crop_valid_counts"):
            assert torch.equal(getattr(alone, name), getattr(sel, name)), name
        assert torch.allclose(alone.crop_ratios, sel.crop_ratios, rtol=0, atol=1e-6)


def test_the_pooled_view_and_regions_cover_the_grid():
    for g in GRIDS:
        x, layout = native_selection_input(_features(g, 0), g, 16, 0.1)
        ph, pw = pooled_shape(*g, 16)
        assert x.thumbnail_scores.shape == (ph * pw,) and ph <= 16 and pw <= 16
        assert int(layout.valid().sum()) == g[0] * g[1] == x.num_crop_tokens
        assert set(x.region_map.tolist()) == set(range(layout.num_crops))  # every region has global cells
        assert layout is region_layout(*g, 16)
        (sel,) = select_images([x])
        assert (
            int(sel.crop_keep.sum()) == native_num_tokens(g[0] * g[1], 0.1) == max(1, int(0.1 * g[0] * g[1]))
        )


def test_an_image_keeps_at_least_one_token():
    assert (
        native_num_tokens(4, 0.1) == 1 and native_num_tokens(1, 0.01) == 1 and native_num_tokens(20, 0.1) == 2
    )
