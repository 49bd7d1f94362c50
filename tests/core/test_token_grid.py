"""The general token-grid core (OneVision down-sampling, InternVL merging) against HF's rules and the NeXT planner."""

from __future__ import annotations

import math

import pytest
import torch

from globalcom2.core.geometry import valid_box
from globalcom2.core.planner import plan_image
from globalcom2.core.token_grid import (
    anyres_max_shape,
    budget_counts,
    footprint,
    merge_pool,
    parse_anyres_max,
    resample_blocks,
    select_on_grid,
)

ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


def _hf_onevision_processor(num_image_tokens: int, pinpoints, max_tiles: int = 9):
    """HF's LlavaOnevisionProcessor counting code, without building a tokenizer (only its count methods run)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)
    proc.num_image_tokens = num_image_tokens
    proc.vision_aspect_ratio = f"anyres_max_{max_tiles}"
    proc.image_processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints)
    return proc


@pytest.mark.parametrize("tile, g", [(384, 27), (40, 5)])
def test_onevision_geometry_equals_hf_processor_count(tile, g):
    """Our OneVision geometry (unpad + anyres_max_9 down-sampling) gives HF's own placeholder count."""
    from globalcom2.adapters.llava_onevision import onevision_geometry
    from globalcom2.demo.tiny_families import onevision_pinpoints

    pinpoints = onevision_pinpoints(tile)
    proc = _hf_onevision_processor(g * g, pinpoints)
    scale = tile / 384
    checked = downsampled = 0
    for h in (20, 100, 333, 384, 500, 768, 1000, 1200, 1536, 2000, 2304, 3000):
        for w in (30, 384, 421, 640, 1024, 1500, 2304, 4000):
            hh, ww = max(int(h * scale), 1), max(int(w * scale), 1)
            geo = onevision_geometry((hh, ww), pinpoints, tile, g, 9)
            assert geo.num_tokens(None) == proc._get_number_of_features(hh, ww, tile, tile), (hh, ww)
            top, bottom, left, right = geo.box
            downsampled += geo.token_grid != (bottom - top, right - left)
            checked += 1
    assert downsampled > 10 and checked - downsampled > 10  # both regimes are exercised


def test_anyres_max_shape_rule():
    assert anyres_max_shape(81, 81, 27, 9) == (81, 81)  # exactly 9 tiles' worth: unchanged
    s = math.sqrt(108 * 108 / (9 * 27 * 27))
    assert anyres_max_shape(108, 108, 27, 9) == (int(108 // s), int(108 // s)) == (81, 81)
    assert parse_anyres_max("anyres_max_9") == 9
    with pytest.raises(ValueError, match="anyres_max_9"):
        parse_anyres_max("anyres")


def test_resample_blocks_anchor_is_the_nearest_patch():
    rows_block, cols_block, anchor_r, anchor_c = resample_blocks(25, 20, 3, 0, 14, 11, g=5)
    for y in range(14):
        src = (y + 0.5) * 25 / 14 - 0.5  # bilinear sample point, in unpadded cells
        assert abs((int(anchor_r[y]) - 3) - src) <= 0.5  # the nearest patch
        assert int(rows_block[y]) == int(anchor_r[y]) // 5
    assert torch.all(torch.diff(rows_block) >= 0) and torch.all(torch.diff(cols_block) >= 0)
    # Without resizing every token is its own patch.
    r, c, ar, ac = resample_blocks(7, 9, 2, 1, 7, 9, g=4)
    assert ar.tolist() == list(range(2, 9)) and ac.tolist() == list(range(1, 10))


def test_footprint_covers_each_patch_by_its_token():
    mask = torch.tensor([[True, False], [False, True]])
    fp = footprint(mask, (1, 5, 0, 4), (6, 4))
    assert fp[0].sum() == 0 and fp[5].sum() == 0  # padding
    assert fp[1:3, 0:2].all() and not fp[1:3, 2:4].any() and fp[3:5, 2:4].all()


def test_merge_pool_groups_are_hf_pixel_shuffle_groups():
    """Token (i, j) of InternVL's pixel shuffle is made of patches 2i..2i+1 x 2j..2j+1: pool the same cells."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    g = 8
    ids = torch.arange(g * g, dtype=torch.float32)
    feats = ids.reshape(1, g, g, 1)  # each patch's feature is its own index
    shuffled = InternVLModel.pixel_shuffle(None, feats, scale_factor=0.5)  # (1, 4, 4, 4): the merged tokens
    groups = shuffled.reshape(-1, 4).long()
    one_hot = torch.zeros(groups.shape[0], g * g)
    one_hot.scatter_(1, groups, 1.0)
    # merge_pool of a one-hot patch score lands in exactly the token that holds that patch.
    pooled = merge_pool(torch.eye(g * g), 2)  # (g*g patches, 16 tokens)
    assert torch.equal(pooled.T, one_hot)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_select_on_grid_equals_plan_image_on_llava_next_geometry(mode):
    """Unpadded blocks without resizing: the general selector and the NeXT planner keep the same tokens."""
    gen = torch.Generator().manual_seed(0)
    g = 6
    for size, grid in [((100, 180), (1, 2)), ((180, 100), (2, 1)), ((150, 150), (2, 2)), ((61, 183), (1, 3)),
                       ((250, 90), (3, 1)), ((37, 200), (1, 3))]:  # fmt: skip
        rows, cols = grid
        thumb = torch.rand(g * g, generator=gen)
        crops = torch.rand(rows * cols, g * g, generator=gen)
        box = valid_box(size[0], size[1], rows * g, cols * g)
        top, bottom, left, right = box
        from globalcom2.core.geometry import tiles_to_grid

        local = tiles_to_grid(crops.reshape(-1, g, g), rows, cols)[top:bottom, left:right]
        rb, cb, _, _ = resample_blocks(bottom - top, right - left, top, left, bottom - top, right - left, g)
        for allocation in ALLOCATIONS:
            for scoring in ("holistic", "local", "global"):
                for ratio in (0.5, 0.25, 0.1):
                    kw = dict(ratio=ratio, mode=mode, allocation=allocation, scoring=scoring)
                    plan, _ = plan_image(thumb, crops, grid=grid, image_size=size, **kw)
                    sel = select_on_grid(thumb, local, rb, cb, grid, **kw)
                    where = (size, allocation, scoring, ratio)
                    assert torch.equal(sel.thumbnail_mask, plan.thumbnail_mask), where
                    assert torch.equal(sel.keep, plan.crops_mask[top:bottom, left:right]), where
                    assert torch.equal(sel.crop_keep_counts, plan.crop_keep_counts), where
                    assert torch.equal(sel.thumbnail_order, plan.thumbnail_order), where


def test_budget_counts_and_crop_budget():
    assert budget_counts(729, 62, 150, 0.57) == (int(729 * 0.57), int(0.57 * 9300))
    gen = torch.Generator().manual_seed(1)
    local = torch.rand(8, 12, generator=gen)
    rb, cb = torch.arange(8) // 4, torch.arange(12) // 4
    sel = select_on_grid(torch.rand(16, generator=gen), local, rb, cb, (2, 3), ratio=0.3, crop_budget=20)
    assert int(sel.keep.sum()) == 20 == int(sel.crop_keep_counts.sum())
    assert torch.all(sel.crop_keep_counts <= sel.crop_valid_counts)
