"""Family geometry against HF's own rules: OneVision's down-sampling, the anchor rule, InternVL's pixel shuffle."""

from __future__ import annotations

import math

import pytest
import torch

from globalcom2.adapters.anyres import footprint, resample_blocks
from globalcom2.adapters.internvl import merge_pool
from globalcom2.adapters.llava_onevision import anyres_max_shape, parse_anyres_max


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
    from globalcom2.adapters.anyres import AnyresGeometry, anyres_grid, valid_box
    from globalcom2.demo.tiny_families import onevision_pinpoints

    pinpoints = onevision_pinpoints(tile)
    proc = _hf_onevision_processor(g * g, pinpoints)
    scale = tile / 384
    checked = downsampled = 0
    for h in (20, 100, 333, 384, 500, 768, 1000, 1200, 1536, 2000, 2304, 3000):
        for w in (30, 384, 421, 640, 1024, 1500, 2304, 4000):
            hh, ww = max(int(h * scale), 1), max(int(w * scale), 1)
            rows, cols = anyres_grid((hh, ww), pinpoints, tile)
            box = valid_box(hh, ww, rows * g, cols * g)
            geo = AnyresGeometry(
                (rows, cols), g, box, anyres_max_shape(box[1] - box[0], box[3] - box[2], g, 9)
            )
            assert geo.num_tokens(None) == proc._get_number_of_features(hh, ww, tile, tile), (hh, ww)
            downsampled += geo.resampled
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
    box, g = (3, 28, 0, 20), 5
    rows_block, cols_block = resample_blocks(box, (14, 11), g)
    for y in range(14):
        src = (y + 0.5) * 25 / 14 - 0.5  # bilinear sample point, in unpadded cells
        anchor = math.floor(src + 0.5)  # the nearest patch (upper one on an exact half)
        assert abs(anchor - src) <= 0.5
        assert int(rows_block[y]) == (3 + anchor) // g
    assert torch.all(torch.diff(rows_block) >= 0) and torch.all(torch.diff(cols_block) >= 0)
    # Without resizing every token is its own patch.
    r, c = resample_blocks((2, 9, 1, 10), (7, 9), 4)
    assert r.tolist() == [p // 4 for p in range(2, 9)] and c.tolist() == [p // 4 for p in range(1, 10)]


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
