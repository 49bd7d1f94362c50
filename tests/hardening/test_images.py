"""Extreme image sizes and every PIL image mode through the real processor and model.

HF's unpadding can leave zero valid rows or columns (1x4000, 4000x1): the crops then contribute nothing (HF
itself drops them). Whatever the size, the processor's placeholder count, the features the model packs and our
formula must stay equal, in both modes; ``generate`` must run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2.adapters.llava_next import image_grid
from tests.conftest import PROMPT, random_image
from tests.core.reference_plain import unpad_box

SIZES = [(1, 1), (1, 4000), (4000, 1), (2, 300), (300, 2), (1, 64), (8000, 8000)]


def _plain_counts(size, grid, g, ratio) -> tuple[int, int]:
    """(uncompressed, budget-mode) image tokens written out for LLaVA-NeXT: g*g thumbnail tokens, the h x w
    unpadded crop grid and one newline per unpadded row; budget mode keeps int(g*g*R) + int(R * h*w) of them."""
    top, bottom, left, right = unpad_box(size[0], size[1], grid[0] * g, grid[1] * g)
    h, w = bottom - top, right - left
    return g * g + h * w + h, int(g * g * ratio) + int(ratio * (h * w)) + h


def _count(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def _image(h: int, w: int) -> Image.Image:
    if h * w > 4_000_000:  # big: smooth gradients are enough and cheap to build
        ramp = Image.linear_gradient("L")
        bands = (ramp.resize((w, h)), ramp.rotate(90).resize((w, h)), ramp.rotate(45).resize((w, h)))
        return Image.merge("RGB", bands)
    return Image.fromarray(np.random.default_rng(h * 7919 + w).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_extreme_sizes_keep_processor_features_and_formula_equal(tiny, size):
    model, processor = tiny
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, cols = image_grid(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    img = _image(*size)
    plain = processor(images=[img], text=[PROMPT], return_tensors="pt")
    full, budget = _plain_counts(size, (rows, cols), g, 0.25)
    assert _count(model, plain) == [full]
    for mode in ("budget", "reference"):
        ratio = 0.25
        with globalcom2.apply(model, processor, ratio=ratio, mode=mode) as gc:
            inputs = (
                processor(images=[img], text=[PROMPT], return_tensors="pt") if mode == "budget" else plain
            )
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2, (size, mode)
            with torch.no_grad():
                feats = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output
            plan = gc.plans[0]
            assert feats[0].shape[0] == plan.num_tokens
            assert plan.num_tokens_full == _count(model, plain)[0]
            top, bottom, left, right = plan.valid_box
            if mode == "budget":
                assert _count(model, inputs) == [plan.num_tokens] == [budget]
                assert gc.adapter.num_image_tokens(*size) == budget
                assert int(plan.crops_mask.sum()) == int(ratio * ((bottom - top) * (right - left)))
            else:
                assert int(plan.crops_mask.sum()) == int(plan.crop_keep_counts.sum())


def test_zero_valid_rows_leave_only_the_thumbnail(tiny):
    """1x4000: HF keeps no crop row at all (and no newline); we keep int(N*R) thumbnail tokens and nothing else."""
    model, processor = tiny
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with globalcom2.apply(model, processor, ratio=0.5) as gc:
        inputs = processor(images=[_image(1, 4000)], text=[PROMPT], return_tensors="pt")
        model(**inputs)
        plan = gc.plans[0]
    top, bottom, _, _ = plan.valid_box
    assert bottom == top and not bool(plan.crops_mask.any())
    assert plan.num_tokens == int(g * g * 0.5) and plan.num_tokens_full == g * g


@pytest.mark.parametrize(
    "size, ratio",
    [((1, 4000), 1.0), ((1, 4000), 0.9), ((90, 170), 1.0)],
    ids=["1x4000-R1", "1x4000-R.9", "90x170-R1"],
)
def test_reference_mode_grows_placeholder_runs_when_needed(tiny, size, ratio):
    """Reference mode writes a newline after every *padded* row, so near R = 1 its sequence can be longer than
    HF's; the placeholder run then grows instead of failing."""
    model, processor = tiny
    img = _image(*size)
    inputs = processor(
        images=[img, random_image(150, 150)], text=[PROMPT] * 2, return_tensors="pt", padding=True
    )
    with globalcom2.apply(model, processor, ratio=ratio, mode="reference") as gc:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        plans = gc.plans
        labels = inputs["input_ids"].clone()
        labels[labels == model.config.image_token_id] = -100
        res = model(**inputs, labels=labels)
        assert torch.isfinite(res.loss)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, _ = plans[0].grid
    counts = plans[0].crop_keep_counts
    assert plans[0].num_tokens == int(g * g * ratio) + int(counts.sum()) + rows * g


def _modes() -> dict[str, Image.Image]:
    rgb = random_image(90, 170, seed=5)
    gray = np.asarray(rgb.convert("L"))
    p_t = rgb.convert("P")
    p_t.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(170)[None, :].repeat(90, 0) % 256).astype(np.uint8)))
    return {
        "L": rgb.convert("L"), "LA": rgb.convert("LA"), "RGBA": rgba, "CMYK": rgb.convert("CMYK"),
        "P": rgb.convert("P"), "P+transparency": p_t, "1": rgb.convert("1"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257), "I": rgb.convert("I"), "F": rgb.convert("F"),
        "YCbCr": rgb.convert("YCbCr"),
    }  # fmt: skip


def test_every_image_mode_gives_consistent_counts(tiny):
    """The API passes images to HF's processor unchanged; whatever the mode, counts and features agree."""
    model, processor = tiny
    images = _modes()
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        inputs = processor(images=list(images.values()), text=[PROMPT] * len(images), return_tensors="pt",
                           padding=True)  # fmt: skip
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        assert _count(model, inputs) == [p.num_tokens for p in gc.plans]
        assert len({p.num_tokens for p in gc.plans}) == 1  # same size, same count, any mode


def test_cli_loader_converts_modes_without_damage(tmp_path):
    """globalcom2.cli.load_image: 16-bit scaled (not clipped), alpha on white, CMYK/palette/gray via PIL, EXIF."""
    from globalcom2.cli import load_image, to_rgb

    ramp16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(ramp16)))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[..., 0], ramp16 / 257.0, atol=0.51)  # scaled, while convert() clips to 255
    assert (np.asarray(Image.fromarray(ramp16).convert("RGB"))[..., 0] == 255).mean() > 0.9
    f = np.asarray(to_rgb(Image.fromarray((ramp16 / 65535.0).astype(np.float32))))[..., 0]
    np.testing.assert_allclose(f, ramp16 / 257.0, atol=0.51)
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent: white, like HF's processors
    assert np.asarray(to_rgb(clear)).min() == 255
    images = _modes()
    suffix = {"CMYK": "jpg", "YCbCr": "jpg", "I": "tiff", "F": "tiff"}
    for name, im in images.items():
        path = tmp_path / f"{name.replace(';', '_').replace('+', '_')}.{suffix.get(name, 'png')}"
        im.save(path)
        loaded = load_image(str(path))
        assert loaded.mode == "RGB" and loaded.size == (170, 90), name
    # EXIF orientation 6 (rotate 90° clockwise to view): the loaded image is upright, i.e. 90 wide x 170 high.
    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(90, 170).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(str(tmp_path / "rot.jpg")).size == (90, 170)
