"""Tests of the Figure-7-style overlay renderer on real photos with hand-made plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")
skdata = pytest.importorskip("skimage.data")

from transformers.image_processing_utils import select_best_resolution  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import (  # noqa: E402
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import unpad_image  # noqa: E402

from globalcom2.core.plan import Plan  # noqa: E402
from globalcom2.viz.overlay import _compose, padded_canvas, render_grid, render_overlay  # noqa: E402
from tests.core.reference_plain import unpad_box  # noqa: E402

TILE = 336
PATCH = 14
G = TILE // PATCH  # 24
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ helpers


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def _best_resolution(image: Image.Image, pinpoints: list[list[int]] = PINPOINTS) -> tuple[int, int]:
    width, height = image.size
    best = select_best_resolution((height, width), pinpoints)
    return int(best[0]), int(best[1])


def _left_half_plan(image: Image.Image, best: tuple[int, int]) -> Plan:
    """Keep the left half of the thumbnail and of every crop (valid cells only)."""
    rows, cols = best[0] // TILE, best[1] // TILE
    gh, gw = rows * G, cols * G
    box = unpad_box(image.size[1], image.size[0], gh, gw)
    valid = np.zeros((gh, gw), dtype=bool)
    valid[box[0] : box[1], box[2] : box[3]] = True
    keep = (np.arange(gw) % G < G // 2)[None, :] & valid
    thumb = np.zeros((G, G), dtype=bool)
    thumb[:, : G // 2] = True
    kept = [
        int(keep[r * G : (r + 1) * G, c * G : (c + 1) * G].sum()) for r in range(rows) for c in range(cols)
    ]
    n_valid = [
        int(valid[r * G : (r + 1) * G, c * G : (c + 1) * G].sum()) for r in range(rows) for c in range(cols)
    ]
    newlines = box[1] - box[0]
    return Plan(
        grid=(rows, cols),
        thumbnail_mask=torch.from_numpy(thumb),
        crops_mask=torch.from_numpy(keep),
        crop_ratios=torch.tensor([k / max(n, 1) for k, n in zip(kept, n_valid, strict=True)]),
        num_tokens=int(thumb.sum()) + int(keep.sum()) + newlines,
        num_tokens_full=G * G + int(valid.sum()) + newlines,
        valid_box=box,
        crop_keep_counts=torch.tensor(kept),
        crop_valid_counts=torch.tensor(n_valid),
    )


def _hf_canvas(image: Image.Image, best: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail and padded crop canvas as produced by transformers' own LLaVA-NeXT processor."""
    chw = np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    tiles = LlavaNextImageProcessorPil().get_image_patches(
        chw, PINPOINTS, size=(TILE, TILE), patch_size=TILE, resample=PILImageResampling.BICUBIC
    )
    rows, cols = best[0] // TILE, best[1] // TILE
    crops = [t.transpose(1, 2, 0) for t in tiles[1:]]
    canvas = np.concatenate(
        [np.concatenate(crops[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    )
    return tiles[0].transpose(1, 2, 0), canvas


def _saturation(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(np.int32)
    return p.max(axis=-1) - p.min(axis=-1)


def _cell_block(pixels: np.ndarray, top: int, left: int, size: int = 6) -> np.ndarray:
    """``size x size`` block at the centre of the 14-px cell whose upper-left pixel is (top, left)."""
    off = (PATCH - size) // 2
    return pixels[top + off : top + off + size, left + off : left + off + size]


# ------------------------------------------------------------------------------------------------ tests


def test_valid_box_rule_matches_hf_unpad() -> None:
    for name in ("astronaut", "rocket"):
        image = _photo(name)
        best = _best_resolution(image)
        gh, gw = best[0] // TILE * G, best[1] // TILE * G
        index = torch.arange(gh * gw).reshape(1, gh, gw)
        unpadded = unpad_image(index, (image.size[1], image.size[0]))
        first = int(unpadded[0, 0, 0])
        top, left = divmod(first, gw)
        box = unpad_box(image.size[1], image.size[0], gh, gw)
        assert box == (top, top + unpadded.shape[1], left, left + unpadded.shape[2])


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_padded_canvas_matches_hf_processor(name: str) -> None:
    image = _photo(name)
    best = _best_resolution(image)
    _, hf_canvas = _hf_canvas(image, best)
    canvas, (top, bottom, left, right) = padded_canvas(image, best)
    np.testing.assert_array_equal(canvas, hf_canvas)
    assert canvas[:top].max(initial=0) == 0 and canvas[bottom:].max(initial=0) == 0
    assert canvas[:, :left].max(initial=0) == 0 and canvas[:, right:].max(initial=0) == 0


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_render_overlay_writes_sensible_png(name: str, tmp_path) -> None:
    image = _photo(name)
    best = _best_resolution(image)
    plan = _left_half_plan(image, best)
    out = tmp_path / f"overlay_{name}.png"
    picture = render_overlay(image, plan, tile_size=TILE, best_resolution=best, title=name, out_path=out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as reread:
        reread.load()
        assert reread.format == "PNG"
        assert reread.size == picture.size
    assert picture.mode == "RGB"
    width, height = picture.size
    assert 700 <= width <= 1400 and 400 <= height <= 1200
    # thumbnail + crop panel side by side: wider than the canvas itself
    assert width > best[1]


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_discarded_cells_greyed_kept_cells_unchanged(name: str) -> None:
    image = _photo(name)
    best = _best_resolution(image)
    plan = _left_half_plan(image, best)
    hf_thumb, hf_canvas = _hf_canvas(image, best)
    picture, layout = _compose(image, plan, tile_size=TILE, best_resolution=best, title=name)
    out = np.asarray(picture)
    assert layout.scale == 1.0 and layout.crops_box is not None

    rows, cols = plan.grid
    vt, vb, vl, vr = plan.valid_box
    c_top, c_left, c_h, c_w = layout.crops_box
    assert (c_h, c_w) == ((vb - vt) * PATCH, (vr - vl) * PATCH)  # padding cut away
    kept_out, kept_src, disc_out, disc_src = [], [], [], []
    for r in range(rows):
        for c in range(cols):
            r0, r1 = max(r * G, vt), min((r + 1) * G, vb)
            for cell_r in range(r0 + (r1 - r0) // 2 - 2, r0 + (r1 - r0) // 2 + 3):  # middle rows
                for cell_c, kept in ((c * G + G // 4, True), (c * G + 3 * G // 4, False)):
                    src = _cell_block(hf_canvas, cell_r * PATCH, cell_c * PATCH)
                    got = _cell_block(out, c_top + (cell_r - vt) * PATCH, c_left + (cell_c - vl) * PATCH)
                    (kept_src if kept else disc_src).append(src)
                    (kept_out if kept else disc_out).append(got)
    np.testing.assert_array_equal(np.stack(kept_out), np.stack(kept_src))
    src_sat = _saturation(np.stack(disc_src)).mean()
    out_sat = _saturation(np.stack(disc_out)).mean()
    assert src_sat > 10.0, "test photo region should be colourful"
    assert out_sat < 0.1 * src_sat
    assert np.stack(disc_out).astype(float).mean() > np.stack(disc_src).astype(float).mean()  # lightened

    # thumbnail: left half kept verbatim, right half greyed
    t_top, t_left, t_h, t_w = layout.thumb_box
    assert (t_h, t_w) == (TILE, TILE)
    for cell_r in range(6, G - 2, 3):
        kept_cell = _cell_block(hf_thumb, cell_r * PATCH, 4 * PATCH)
        np.testing.assert_array_equal(_cell_block(out, t_top + cell_r * PATCH, t_left + 4 * PATCH), kept_cell)
        grey_cell = _cell_block(out, t_top + cell_r * PATCH, t_left + 19 * PATCH)
        assert _saturation(grey_cell).max() <= 1


def test_crop_panel_exact_away_from_annotations() -> None:
    """Every crop-panel pixel away from borders and labels: kept = source, discarded = pure grey."""
    image = _photo("rocket")
    best = _best_resolution(image)
    plan = _left_half_plan(image, best)
    _, hf_canvas = _hf_canvas(image, best)
    picture, layout = _compose(image, plan, tile_size=TILE, best_resolution=best, title=None)
    out = np.asarray(picture).astype(np.int32)
    assert layout.crops_box is not None
    c_top, c_left, c_h, c_w = layout.crops_box
    vt, _, vl, _ = plan.valid_box
    y0, x0 = vt * PATCH, vl * PATCH
    panel = out[c_top : c_top + c_h, c_left : c_left + c_w]
    source = hf_canvas[y0 : y0 + c_h, x0 : x0 + c_w].astype(np.int32)

    ys = np.arange(c_h)[:, None] + y0  # canvas coordinates
    xs = np.arange(c_w)[None, :] + x0
    clean = (
        (np.abs((ys + TILE // 2) % TILE - TILE // 2) > 5)  # away from horizontal crop borders
        & (np.abs((xs + TILE // 2) % TILE - TILE // 2) > 5)  # and vertical ones
        & ~((ys - np.maximum(ys // TILE * TILE, y0) < 70) & (xs % TILE < 120))  # and each crop's label
    )
    clean[:3, :] = clean[-3:, :] = False
    clean[:, :3] = clean[:, -3:] = False
    kept = np.broadcast_to((xs % TILE) < TILE // 2, clean.shape)
    np.testing.assert_array_equal(panel[clean & kept], source[clean & kept])
    grey = panel[clean & ~kept]
    assert (grey.max(axis=-1) - grey.min(axis=-1)).max() <= 1
    assert (np.abs(panel[clean & ~kept] - source[clean & ~kept]).sum(axis=-1) > 0).mean() > 0.9


def test_single_tile_plan_has_thumbnail_only(tmp_path) -> None:
    image = _photo("astronaut")
    mask = np.zeros((G, G), dtype=bool)
    mask[:, : G // 2] = True
    plan = Plan(
        grid=(0, 0),
        thumbnail_mask=torch.from_numpy(mask),
        crops_mask=torch.zeros(0, 0, dtype=torch.bool),
        crop_ratios=torch.zeros(0),
        num_tokens=int(mask.sum()),
        num_tokens_full=G * G,
    )
    picture, layout = _compose(image, plan, tile_size=TILE, best_resolution=(TILE, TILE), title="single")
    assert layout.crops_box is None
    assert picture.size[0] < 700
    out = tmp_path / "single.png"
    render_overlay(image, plan, tile_size=TILE, best_resolution=(TILE, TILE), out_path=out)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_large_grid_is_scaled_down_and_still_greys() -> None:
    image = Image.fromarray(np.ascontiguousarray(skdata.rocket().transpose(1, 0, 2)))  # tall
    pins = [[1344, 672]]
    best = _best_resolution(image, pins)
    rows, cols = best[0] // TILE, best[1] // TILE
    keep = np.zeros((rows * G, cols * G), dtype=bool)
    keep[:, : cols * G // 2] = True
    plan = Plan(
        grid=(rows, cols),
        thumbnail_mask=torch.ones(G, G, dtype=torch.bool),
        crops_mask=torch.from_numpy(keep),
        crop_ratios=torch.full((rows * cols,), 0.5),
        num_tokens=100,
        num_tokens_full=200,
        valid_box=(0, rows * G, 0, cols * G),
    )
    picture, layout = _compose(image, plan, tile_size=TILE, best_resolution=best, title="big")
    assert picture.size[0] <= 1400 and picture.size[1] <= 1200
    assert layout.scale < 1.0


def test_mismatched_best_resolution_raises() -> None:
    image = _photo("astronaut")
    best = _best_resolution(image)
    plan = _left_half_plan(image, best)
    with pytest.raises(ValueError, match="best_resolution"):
        render_overlay(image, plan, tile_size=TILE, best_resolution=(336, 1008))


def test_render_grid_stitches_panels(tmp_path) -> None:
    panels = []
    for name in ("astronaut", "rocket"):
        image = _photo(name)
        best = _best_resolution(image)
        picture = render_overlay(image, _left_half_plan(image, best), tile_size=TILE, best_resolution=best)
        panels.append((name, picture))
    out = tmp_path / "grid.png"
    grid = render_grid(panels, out, ncols=2)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert grid.mode == "RGB"
    assert grid.size[0] >= sum(p.size[0] for _, p in panels)
    assert grid.size[1] >= max(p.size[1] for _, p in panels)
    one_col = render_grid(panels, None, ncols=1)
    assert one_col.size[1] >= sum(p.size[1] for _, p in panels)


def test_render_grid_shows_each_title_once() -> None:
    """A caption the panel's own title already states is left out; a caption-less row takes no space."""
    image = _photo("astronaut")
    best = _best_resolution(image)
    plan = _left_half_plan(image, best)
    titled = render_overlay(image, plan, tile_size=TILE, best_resolution=best, title="astronaut, R = 50%")
    untitled = render_overlay(image, plan, tile_size=TILE, best_resolution=best)
    bare = render_grid([(None, titled), (None, titled)], ncols=1)
    # the CLI's old call: caption "R = 50%" under a title that says "R = 50%"
    assert render_grid([("R = 50%", titled), ("R = 50%", titled)], ncols=1).size == bare.size
    assert np.array_equal(np.asarray(render_grid([("R = 50%", titled)], ncols=1)),
                          np.asarray(render_grid([(None, titled)], ncols=1)))  # fmt: skip
    # a caption that adds something is drawn, once per row
    assert render_grid([("other", titled), ("other", titled)], ncols=1).size[1] == bare.size[1] + 2 * 34
    assert (
        render_grid([("R = 50%", untitled)], ncols=1).size[1]
        == render_grid([(None, untitled)], ncols=1).size[1] + 34
    )
    assert bare.size[1] == 2 * 16 + 2 * titled.size[1] + 24  # margins, two panels, one gap: no caption rows
