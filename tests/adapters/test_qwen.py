"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (native resolution): counts, M-RoPE positions, deepstack, videos.

Tiny random checkpoints of the real classes, built offline once per module (``globalcom2.demo.tiny_qwen``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import globalcom2
from globalcom2.core.regions import band_index, region_grid
from globalcom2.loading import load_tiny_family
from tests.conftest import random_image, sweep

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|>\nWhat is shown? ASSISTANT:"
# (height, width) in pixels; with 8 px per merged token: H or W < 16, odd rows, one region, many regions
SIZES = (
    (40, 40), (56, 300), (100, 180), (200, 90), (150, 150), (61, 183), (33, 250), (127, 129), (136, 136),
    (240, 250), (90, 410), (250, 70),
)  # fmt: skip


@pytest.fixture(scope="module")
def qwen_dirs(checkpoint):
    """Family name -> its tiny checkpoint, the family table's own (built once per session)."""
    from globalcom2.demo import tiny_qwen

    return lambda name: checkpoint(getattr(tiny_qwen, f"build_tiny_{name}"))


def _merged(inputs) -> list[tuple[int, int]]:
    return [(int(h) // 2, int(w) // 2) for _, h, w in inputs["image_grid_thw"].tolist()]


def test_regions_are_near_equal_bands_of_at_most_g():
    for n in (1, 5, 15, 16, 17, 31, 33, 37, 69):
        for g in (4, 16):
            band = band_index(n, g)
            sizes = torch.bincount(band).tolist()
            assert len(sizes) == region_grid(n, 1, g)[0] and max(sizes) <= g and max(sizes) - min(sizes) <= 1
            assert torch.equal(band, band.sort().values)


@pytest.mark.parametrize("name", sweep(QWEN, ["qwen2_5_vl"]))
def test_processor_count_equals_features_equals_formula(qwen_dirs, name):
    """12 sizes x R = 50/25/10 % and max_image_tokens: the processor's <|image_pad|> count, its serving count,
    the features the model hands the LLM and the formula max(1, int(R*H*W)) (min(T, H*W)) agree."""
    model, processor = load_tiny_family(qwen_dirs(name))
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    token = model.config.image_token_id
    for budget in ({"ratio": 0.5}, {"ratio": 0.25}, {"ratio": 0.1}, {"max_image_tokens": 40}):
        with globalcom2.apply(model, processor, **budget) as handle:
            inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
            grids = _merged(inputs)
            if "ratio" in budget:
                expected = [max(1, int(budget["ratio"] * (h * w))) for h, w in grids]
            else:
                expected = [min(budget["max_image_tokens"], h * w) for h, w in grids]
            assert (inputs["input_ids"] == token).sum(-1).tolist() == expected
            sizes = [(img.height, img.width) for img in images]
            assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == expected
            with torch.no_grad():
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            assert [f.shape[0] for f in out.pooler_output] == expected
            assert [p.num_tokens for p in handle.plans] == expected
            assert [handle.adapter.num_image_tokens(h, w) for h, w in grids] == expected
    assert any(h < 16 or w < 16 for h, w in grids) and any(h % 2 for h, _ in grids)


def _positions(model, inputs, call: str) -> list[torch.Tensor]:
    """Position ids the LLM receives on every forward of one ``call`` ((3, B, L), M-RoPE rows only)."""
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"][-3:].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            if call == "generate":
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
            else:
                model(**inputs)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("name", sweep(QWEN, ["qwen2_5_vl", "qwen3_vl"]))
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_kept_tokens_and_text_keep_their_uncompressed_positions(qwen_dirs, name, call):
    """Two images of different sizes in a left-padded batch: every kept token's (t, h, w), the text after the image
    and every generated token have the positions of the uncompressed run."""
    model, processor = load_tiny_family(qwen_dirs(name))
    images = [random_image(100, 180, seed=1), random_image(61, 150, seed=2)]
    prompts = [PROMPT, "Hi. " + PROMPT + " Say more."]
    full_inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    full = _positions(model, full_inputs, call)
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        got = _positions(model, inputs, call)
        plans = handle.plans
    token = model.config.image_token_id
    assert len(got) == len(full) and inputs["input_ids"].shape[1] < full_inputs["input_ids"].shape[1]
    for b, plan in enumerate(plans):
        f_ids, c_ids = full_inputs["input_ids"][b], inputs["input_ids"][b]
        f_img, c_img = (f_ids == token).nonzero().reshape(-1), (c_ids == token).nonzero().reshape(-1)
        kept = plan.crops_mask.reshape(-1).nonzero().reshape(-1)
        assert torch.equal(got[0][:, b, c_img], full[0][:, b, f_img[kept]])
        assert torch.equal(
            got[0][:, b, c_img[-1] + 1 :], full[0][:, b, f_img[-1] + 1 :]
        )  # text after the image
        assert int(f_ids.numel()) - int(f_img[-1]) - 1 > 0  # there is text after the image
        for step in range(1, len(got)):  # every decoding step
            assert torch.equal(got[step][:, b], full[step][:, b]), step


@pytest.mark.parametrize("name", sweep(("qwen3_vl",), ["qwen3_vl"]))
def test_deepstack_features_are_trimmed_to_the_kept_tokens(qwen_dirs, name):
    """Qwen3-VL: the deepstack features and visual_pos_masks the LLM receives equal a plain trim of the uncompressed
    deepstack features to each image's kept tokens."""
    model, processor = load_tiny_family(qwen_dirs(name))
    images = [random_image(100, 180, seed=3), random_image(150, 150, seed=4)]
    plain = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model.model.get_image_features(plain["pixel_values"], plain["image_grid_thw"])
    seen: dict = {}
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        inputs = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.update(kwargs=k) and None, with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        plans = handle.plans
    kwargs = seen["kwargs"]
    assert torch.equal(kwargs["visual_pos_masks"], inputs["input_ids"] == model.config.image_token_id)
    layers = kwargs["deepstack_visual_embeds"]
    assert len(layers) == len(full.deepstack_features) >= 1
    for layer, per_image in zip(layers, full.deepstack_features, strict=True):
        expected = torch.cat([f[p.crops_mask.reshape(-1)] for f, p in zip(per_image, plans, strict=True)])
        assert torch.equal(layer, expected)


def test_reference_mode_is_refused(qwen_dirs):
    model, processor = load_tiny_family(qwen_dirs("qwen2_5_vl"))
    with pytest.raises(globalcom2.UnsupportedModelError, match="mode='reference' is not defined"):
        globalcom2.apply(model, processor, ratio=0.25, mode="reference")
    assert not any("globalcom2" in k for k in vars(model))  # nothing was patched


def _video_inputs(processor, image=None):
    """A prompt with one tiny video (1 x 8 x 8 patches -> 16 tokens), built by hand (no torchvision here), and
    optionally one image."""
    tok = processor.tokenizer
    video_text = "<|vision_start|>" + "<|video_pad|>" * 16 + "<|vision_end|>"
    video = tok([video_text + " What happens?"], return_tensors="pt")
    if image is None:
        inputs = dict(video)
    else:  # the processor refuses video tokens without videos: the video part is appended to its output
        inputs = dict(processor(images=[image], text=[PROMPT], return_tensors="pt"))
        for key in ("input_ids", "attention_mask"):
            inputs[key] = torch.cat([inputs[key], video[key]], dim=1)
    ids = inputs["input_ids"]
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    inputs["mm_token_type_ids"] = torch.where(
        ids == video_id, 2, (ids == processor.image_token_id).long()
    ).int()
    generator = torch.Generator().manual_seed(0)
    inputs["pixel_values_videos"] = torch.randn(64, 3 * 2 * 4 * 4, generator=generator)
    inputs["video_grid_thw"] = torch.tensor([[1, 8, 8]])
    return inputs


def test_videos_pass_through_uncompressed_with_one_warning(qwen_dirs):
    model, processor = load_tiny_family(qwen_dirs("qwen2_5_vl"))
    video_only = _video_inputs(processor)
    with torch.no_grad():
        plain = model.generate(**video_only, max_new_tokens=3, do_sample=False)
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        with pytest.warns(UserWarning, match="videos are passed to the LLM uncompressed"):
            with torch.no_grad():
                got = model.generate(**_video_inputs(processor), max_new_tokens=3, do_sample=False)
        assert torch.equal(got, plain)
        mixed = _video_inputs(processor, random_image(100, 180, seed=5))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per handle
            with torch.no_grad():
                model.generate(**mixed, max_new_tokens=2, do_sample=False)
        (plan,) = handle.plans
        assert (
            plan.num_tokens
            == int((mixed["input_ids"] == processor.image_token_id).sum())
            < plan.num_tokens_full
        )


# (height, width) pixels -> merged grids 5x5 (one region), 7x38 (H < G), 25x11 (W < G), 19x19 (odd rows, 2x2),
# 13x22, 31x33 (3x3 regions of uneven bands)
PLAIN_SIZES = ((40, 40), (56, 300), (200, 90), (150, 150), (100, 180), (250, 265))
PLAIN_OPTIONS = [
    {"allocation": a, "scoring": s} for a in ("softmax-sum", "softmax-max", "topk-count", "uniform")
    for s in ("holistic", "local", "global")
] + [{"alpha": 0.3, "tau": 2.0}, {"ratio": 0.1}, {"ratio": 0.02, "region_tokens": 6}]  # fmt: skip
PLAIN_IDS = ["-".join(f"{k}={v}" for k, v in o.items()) for o in PLAIN_OPTIONS]
PLAIN_DEFAULT = (0, 4, 8, 9, 11, 12, 13, 14)  # every allocation and scoring at least once, and the options


@pytest.fixture(scope="module", params=sweep(QWEN, ["qwen2_5_vl"]))
def plain_setup(request, qwen_dirs):
    """(model, processor, images, merged grids, uncompressed features per image) of one family."""
    model, processor = load_tiny_family(qwen_dirs(request.param))
    images = [random_image(h, w, seed=20 + i) for i, (h, w) in enumerate(PLAIN_SIZES)]
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return model, processor, images, _merged(inputs), features.pooler_output


@pytest.mark.parametrize("case", sweep(range(len(PLAIN_OPTIONS)), PLAIN_DEFAULT, ids=PLAIN_IDS))
def test_selection_equals_a_plain_reimplementation_of_the_documented_rule(plain_setup, case):
    """tests/adapters/plain_native.py (written from docs/qwen.md, no library import) gives the same kept sets,
    per-region counts and r_j, and the LLM reads exactly the uncompressed features of those tokens, in raster
    order, for every allocation and scoring, several sizes (H or W < G, odd rows, one region) and options."""
    from tests.adapters.plain_native import plain_native

    model, processor, images, grids, features = plain_setup
    assert any(h < 16 for h, _ in grids) and any(w < 16 for _, w in grids) and any(h % 2 for h, _ in grids)
    token = model.config.image_token_id
    options = {"ratio": 0.25, **PLAIN_OPTIONS[case]}
    seen: dict = {}
    with globalcom2.apply(model, processor, **options) as handle:
        inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.update(embeds=k["inputs_embeds"]) and None, with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        plans = handle.plans
    rows = seen["embeds"][inputs["input_ids"] == token]
    expected_rows = []
    for f, grid, plan in zip(features, grids, plans, strict=True):
        kept, counts, r = plain_native(
            f, grid, options.get("region_tokens", 16), options["ratio"],
            **{k: v for k, v in options.items() if k in ("allocation", "scoring", "alpha", "tau")},
        )  # fmt: skip
        assert torch.equal(plan.crops_mask, kept), grid
        assert plan.crop_keep_counts.tolist() == counts, grid
        if int(options["ratio"] * grid[0] * grid[1]) >= 1:  # else R is raised to keep one token
            assert torch.allclose(plan.crop_ratios.double(), torch.tensor(r, dtype=torch.float64), atol=1e-6)
        expected_rows.append(f[kept.reshape(-1)])
    assert torch.equal(rows, torch.cat(expected_rows))


def test_visualize_draws_regions_and_kept_tokens(qwen_dirs, tmp_path):
    """`globalcom2 visualize` on a Qwen checkpoint (a real subprocess): an overlay is written and the JSON plan
    holds the regions and the count of the formula."""
    import json

    from tests.test_cli import run_cli

    out = tmp_path / "qwen.png"
    res = run_cli("visualize", "--model", str(qwen_dirs("qwen2_5_vl")), "--image", "photo:rocket", "--ratio",
                  "0.25", "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)["plans"][0]
    assert out.stat().st_size > 10_000
    full = plan["num_tokens_full"]
    assert (
        plan["num_tokens"] == int(0.25 * full) == sum(plan["crop_keep_counts"])
        and plan["thumbnail_kept"] == 0
    )
    assert len(plan["crop_ratios"]) == plan["grid"][0] * plan["grid"][1] > 1


@pytest.mark.parametrize("name", sweep(QWEN, ["qwen3_vl"]))
def test_pooling_baseline_averages_bins_at_their_centre_positions(qwen_dirs, name):
    """Pooling on a native-resolution family: the processor's count is a*b, the LLM reads each bin's mean (a
    plain computation of the documented bins), deepstack features likewise, at the centre token's position."""
    import math

    from globalcom2.adapters import adapter_for
    from globalcom2.adapters.base import install
    from globalcom2.config import GlobalComConfig
    from globalcom2.methods.native import native_pooling_class

    model, processor = load_tiny_family(qwen_dirs(name))
    images = [random_image(100, 180, seed=8), random_image(150, 61, seed=9)]
    plain = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model.model.get_image_features(plain["pixel_values"], plain["image_grid_thw"])
    full_pos = _positions(model, plain, "forward")[0]
    adapter = native_pooling_class(adapter_for(model))(model, processor, GlobalComConfig(ratio=0.25))
    seen: dict = {}
    with install(adapter, method="pooling") as handle:
        inputs = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.update(k) and None, with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        plans = handle.plans
    token = model.config.image_token_id
    rows = seen["inputs_embeds"][inputs["input_ids"] == token]
    expected, expected_ds = [], []
    for b, ((h, w), plan) in enumerate(zip(_merged(plain), plans, strict=True)):
        a_, b_ = (max(1, math.floor(n * math.sqrt(0.25) + 0.5)) for n in (h, w))
        assert plan.num_tokens == a_ * b_ == int((inputs["input_ids"][b] == token).sum())
        grid = full.pooler_output[b].reshape(h, w, -1)
        ds = [layer[b].reshape(h, w, -1) for layer in (getattr(full, "deepstack_features", None) or [])]
        for i in range(a_):
            ys = [y for y in range(h) if y * a_ // h == i]
            for j in range(b_):
                xs = [x for x in range(w) if x * b_ // w == j]
                expected.append(grid[ys][:, xs].reshape(-1, grid.shape[-1]).mean(0))
                expected_ds.append([d[ys][:, xs].reshape(-1, d.shape[-1]).mean(0) for d in ds])
                assert bool(plan.crops_mask[(ys[0] + ys[-1]) // 2, (xs[0] + xs[-1]) // 2])
        f_img = (plain["input_ids"][b] == token).nonzero().reshape(-1)
        c_img = (inputs["input_ids"][b] == token).nonzero().reshape(-1)
        kept = plan.crops_mask.reshape(-1).nonzero().reshape(-1)
        assert torch.equal(seen["position_ids"][-3:, b, c_img], full_pos[:, b, f_img[kept]])
    assert torch.allclose(rows, torch.stack(expected), atol=1e-6)
    if getattr(full, "deepstack_features", None):
        for k, layer in enumerate(seen["deepstack_visual_embeds"]):
            assert torch.allclose(layer, torch.stack([e[k] for e in expected_ds]), atol=1e-6)


def test_two_images_in_one_prompt_with_beam_search_keep_their_positions(qwen_dirs):
    """A batch of a two-image prompt and a one-image prompt, generated with 2 beams: kept tokens of both images,
    the text between and after them, and every decoding step have the uncompressed run's positions."""
    model, processor = load_tiny_family(qwen_dirs("qwen3_vl"))
    images = [
        [random_image(100, 180, seed=11), random_image(61, 150, seed=12)],
        [random_image(120, 90, seed=13)],
    ]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"A {image} and B {image} compare.", f"One {image} only, with a longer text."]

    def run() -> tuple[dict, list[torch.Tensor]]:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        seen: list[torch.Tensor] = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"][-3:].clone()) and None, with_kwargs=True
        )
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
        hook.remove()
        return inputs, seen

    full_inputs, full = run()
    with globalcom2.apply(model, processor, ratio=0.3) as handle:
        inputs, got = run()
        masks = [p.crops_mask.reshape(-1) for p in handle.plans]
    token = model.config.image_token_id
    assert len(got) == len(full) and len(masks) == 3
    for b, own in ((0, masks[:2]), (1, masks[2:])):
        beam = 2 * b  # the first beam of sample b
        offsets = [0, *torch.tensor([m.numel() for m in own]).cumsum(0).tolist()[:-1]]
        kept = torch.cat([m.nonzero().reshape(-1) + o for m, o in zip(own, offsets, strict=True)])
        f_img = (full_inputs["input_ids"][b] == token).nonzero().reshape(-1)
        c_img = (inputs["input_ids"][b] == token).nonzero().reshape(-1)
        assert torch.equal(got[0][:, beam, c_img], full[0][:, beam, f_img[kept]])
        assert torch.equal(got[0][:, beam, c_img[-1] + 1 :], full[0][:, beam, f_img[-1] + 1 :])
        for step in range(1, len(got)):
            assert torch.equal(got[step][:, beam], full[step][:, beam]), step


def test_region_tokens_is_validated():
    from globalcom2 import GlobalComConfig

    assert GlobalComConfig(region_tokens=8).region_tokens == 8 and GlobalComConfig().region_tokens is None
    for bad in (0, -3, True, 2.5, "16"):
        with pytest.raises(ValueError, match="region_tokens"):
            GlobalComConfig(region_tokens=bad)
