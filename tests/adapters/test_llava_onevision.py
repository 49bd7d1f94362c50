"""GlobalCom² on a real (tiny, random) LlavaOnevisionForConditionalGeneration loaded with from_pretrained.

Also the Eq. 7 ablation on LLaVA-NeXT (``importance="cosine"`` on a [CLS] model).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import globalcom2
from tests.adapters.families import visualize_standin_plan
from tests.adapters.plain_families import plain_cosine, plain_onevision, plain_onevision_sequence, spy
from tests.conftest import random_image
from tests.core.reference_plain import (
    plain_cls_logits,
    plain_reference,
    plain_sequence,
    stable_top,
    unpad_box,
)

# (height, width): no down-sampling (1x1 .. 3x3, 1x6, 2x5 grids, one valid row) and down-sampled large grids.
SIZES = [
    (56, 56), (40, 70), (70, 40), (84, 140), (150, 170), (46, 108), (140, 250), (250, 140),
    (56, 320), (210, 210), (320, 336), (85, 256), (126, 350), (18, 280), (300, 100),
]  # fmt: skip
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


@pytest.fixture(scope="module")
def ov_dir(checkpoint):
    from globalcom2.demo.tiny_families import build_tiny_llava_onevision

    return checkpoint(build_tiny_llava_onevision)


@pytest.fixture()
def ov(ov_dir):
    from globalcom2.loading import load_tiny_family

    return load_tiny_family(ov_dir)


def _g(model) -> int:
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def _grid(model, size):
    from transformers.image_processing_utils import select_best_resolution

    tile = model.config.vision_config.image_size
    best = select_best_resolution(list(size), model.config.image_grid_pinpoints)
    return best[0] // tile, best[1] // tile


def _plain_token_grid(model, size) -> tuple[tuple[int, int], bool]:
    """((H, W), down-sampled?) of the crop tokens OneVision hands the LLM, written out: the unpadded grid,
    bilinearly down-sampled by the anyres_max_9 rule when it holds more than 1.1² x 9 tiles' worth."""
    g = _g(model)
    rows, cols = _grid(model, size)
    top, bottom, left, right = unpad_box(size[0], size[1], rows * g, cols * g)
    h, w = bottom - top, right - left
    s = math.sqrt(h * w / (9 * g * g))
    return ((int(h // s), int(w // s)), True) if s > 1.1 else ((h, w), False)


def _kept_tokens(plan) -> torch.Tensor:
    """Kept crop tokens on the (H, W) grid the LLM receives: ``token_mask`` when OneVision down-sampled the crop
    grid, else the valid box of ``crops_mask`` (the plan carries no ``token_mask`` then)."""
    top, bottom, left, right = plan.valid_box
    resampled = plan.token_grid is not None
    assert (plan.token_mask is not None) == resampled
    if resampled:
        assert tuple(plan.token_mask.shape) == plan.token_grid
        return plan.token_mask
    return plan.crops_mask[top:bottom, left:right]


def _raw(model, inputs):
    """Projector input per tile, and HF's own packed sequences, computed without the patched code paths."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    counts = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"]
    ]
    pv = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], counts, strict=True)])
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
        selected = hs[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        feats = torch.split(model.model.multi_modal_projector(selected), counts)
        packed, _ = type(model.model).pack_image_features(
            model.model, feats, inputs["image_sizes"], image_newline=model.model.image_newline,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
        )  # fmt: skip
    return hs, selected, packed, counts


# -- counts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_budget_counts_processor_equals_features_equals_formula(ov, ratio):
    from globalcom2.adapters.llava_onevision import LlavaOnevisionAdapter
    from globalcom2.config import GlobalComConfig

    model, processor = ov
    g = _g(model)
    adapter = LlavaOnevisionAdapter(model, processor, GlobalComConfig(ratio=ratio))
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    full = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
    with globalcom2.apply(model, processor, ratio=ratio) as gc:
        inputs = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
        with torch.no_grad():
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        counted = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
        serving = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
        plans = list(gc.plans)
    full_counts = (full["input_ids"] == model.config.image_token_id).sum(1).tolist()
    for k, size in enumerate(SIZES):
        (h, w), resampled = _plain_token_grid(model, size)
        geo = adapter.geometry(size)
        assert geo.token_grid == (h, w), size
        expected = int(g * g * ratio) + int(ratio * (h * w)) + h
        assert adapter.num_image_tokens(*size) == geo.num_tokens(ratio) == expected, size
        assert counted[k] == feats[k].shape[0] == plans[k].num_tokens == serving[k] == expected, size
        assert full_counts[k] == plans[k].num_tokens_full == g * g + h * w + h == geo.num_tokens(None), size
        assert geo.resampled == resampled, size
        assert plans[k].token_grid == ((h, w) if resampled else None), size
        assert int(plans[k].crop_keep_counts.sum()) == int(ratio * (h * w))
        assert torch.all(plans[k].crop_keep_counts <= plans[k].crop_valid_counts)


# -- scores and selection against the plain re-implementation ------------------------------------------------------
@pytest.mark.parametrize("mode, ratio", [("reference", 0.25), ("budget", 0.1)])
def test_kept_tokens_and_sequence_match_plain(ov, monkeypatch, mode, ratio):
    """Eq. 7 scores, kept masks, per-crop counts and the emitted sequence equal the plain re-implementation.

    The scores are checked against the plain Eq. 7 numerically; the selection is then replayed plainly from the
    scores the library used, so that a one-ulp float32 difference cannot flip a near-tie (bilinear resizing makes
    such near-ties at the grid's edges) and the comparison can be exact.
    """
    from globalcom2.adapters import family

    model, processor = ov
    g = _g(model)
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    inputs = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
    _, selected, packed_full, counts = _raw(model, inputs)
    used = spy(monkeypatch, family, "cosine_scores")  # the scoring hook every family shares
    for allocation in ALLOCATIONS:
        for scoring in ("holistic", "local", "global"):
            gc = globalcom2.apply(
                model, processor, ratio=ratio, mode=mode, allocation=allocation, scoring=scoring
            )
            with torch.no_grad():
                packed = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output
            plans = list(gc.plans)
            gc.remove()
            if len(used) == 1:
                np.testing.assert_allclose(used[0].numpy(), plain_cosine(selected), atol=2e-6)
            assert torch.equal(used[-1], used[0])  # the same images give the same scores under every option
            scores = used[-1].numpy()
            start = 0
            for k, size in enumerate(SIZES):
                s = scores[start : start + counts[k]]
                start += counts[k]
                plan = plans[k]
                given = plan.crop_keep_counts.tolist() if mode == "budget" else None
                t_mask, t_order, r, keep, ks = plain_onevision(
                    s[0], s[1:], _grid(model, size), size, g, ratio, allocation, scoring, counts=given
                )
                where = f"{size} R={ratio} {mode} {allocation} {scoring}"
                np.testing.assert_allclose(plan.crop_ratios.numpy(), r, rtol=1e-5, err_msg=where)
                assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask.reshape(g, g)), where
                assert np.array_equal(_kept_tokens(plan).numpy(), keep), where
                assert plan.crop_keep_counts.tolist() == ks, where
                order = t_order if mode == "reference" else np.flatnonzero(t_mask)
                seq = plain_onevision_sequence(order, keep, g)
                torch.testing.assert_close(packed[k], packed_full[k][seq], msg=where)


def test_eq7_scores_are_computed_on_the_projector_input(ov):
    """The thumbnail kept in reference mode is the top of Eq. 7 on the selected feature layer (plain scores)."""
    model, processor = ov
    g = _g(model)
    inputs = processor(images=[random_image(140, 250)], text=[PROMPT], return_tensors="pt")
    _, selected, _, _ = _raw(model, inputs)
    scores = plain_cosine(selected)
    with globalcom2.apply(model, processor, ratio=0.5, mode="reference") as gc:
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        plan = gc.plans[0]
    assert set(plan.thumbnail_order.tolist()) == set(stable_top(list(scores[0]), int(g * g * 0.5)))


def test_footprint_and_summary_of_a_downsampled_plan(ov):
    model, processor = ov
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        inputs = processor(images=[random_image(320, 336)], text=[PROMPT], return_tensors="pt")
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        plan = gc.plans[0]
    g = _g(model)
    rows, cols = plan.grid
    top, bottom, left, right = plan.valid_box
    h, w = plan.token_grid
    assert (h, w) != (bottom - top, right - left)  # this image is down-sampled
    assert plan.crops_mask.shape == (rows * g, cols * g)
    # Every patch shows the token that covers it.
    ys = torch.arange(bottom - top) * h // (bottom - top)
    xs = torch.arange(right - left) * w // (right - left)
    assert torch.equal(plan.crops_mask[top:bottom, left:right], plan.token_mask[ys][:, xs])
    assert not plan.crops_mask[:top].any() and not plan.crops_mask[bottom:].any()
    summary = plan.summary()
    assert summary["crops_kept"] == int(plan.token_mask.sum()) and summary["token_grid"] == [h, w]


# -- the model end to end --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_and_forward_with_labels(ov, mode):
    model, processor = ov
    image = random_image(210, 210)
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as gc:
        inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        labels = inputs["input_ids"].clone()
        labels[labels == model.config.image_token_id] = -100
        res = model(**inputs, labels=labels)
        assert torch.isfinite(res.loss)
        assert gc.plans[0].num_tokens < gc.plans[0].num_tokens_full


def test_multi_image_prompts_are_left_untouched(ov):
    """HF encodes the images of a multi-image sample as one base tile each: no crops, so nothing is compressed."""
    model, processor = ov
    images = [[random_image(140, 250), random_image(84, 84, seed=1)], [random_image(210, 210, seed=2)]]
    texts = ["USER: <image><image>\nCompare. ASSISTANT:", PROMPT]
    plain = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**plain).logits
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            got = model(**inputs).logits
        plans = list(gc.plans)
    g = _g(model)
    assert [p.num_tokens for p in plans[:2]] == [g * g + 1] * 2  # base tile + newline, untouched
    assert plans[2].num_tokens < plans[2].num_tokens_full  # the single image of sample 2 is compressed
    n0 = int((plain["input_ids"][0] != processor.tokenizer.pad_token_id).sum())
    # Sample 0 holds only untouched images: its logits are those of the unpatched model.
    torch.testing.assert_close(got[0, -n0:], ref[0, -n0:], rtol=1e-5, atol=1e-5)


def _video_inputs(model, processor, frames: int = 4, text: str = "hi"):
    g = _g(model)
    num = frames * math.ceil(g / 2) ** 2 + 1  # HF: 2x2-pooled frames + one newline
    ids = processor.tokenizer(f"USER: {'<video>' * num}\n{text} ASSISTANT:", return_tensors="pt")
    torch.manual_seed(0)
    tile = model.config.vision_config.image_size
    return ids, torch.randn(1, frames, 3, tile, tile)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_video_inputs_are_left_untouched(ov, mode):
    model, processor = ov
    ids, video = _video_inputs(model, processor)
    with torch.no_grad():
        ref = model(**ids, pixel_values_videos=video).logits
    with globalcom2.apply(model, processor, ratio=0.1, mode=mode) as gc:
        with torch.no_grad():
            got = model(**ids, pixel_values_videos=video).logits
        assert gc.plans == []
        # A video beside an image in one call: the image is compressed, the video passes through.
        image_inputs = processor(images=[random_image(140, 250)], text=[PROMPT], return_tensors="pt")
        vid_ids = ids["input_ids"]
        joined = torch.cat([image_inputs["input_ids"], vid_ids], dim=1)
        with torch.no_grad():
            out = model(
                input_ids=joined, attention_mask=torch.ones_like(joined),
                pixel_values=image_inputs["pixel_values"], image_sizes=image_inputs["image_sizes"],
                pixel_values_videos=video,
            )  # fmt: skip
        assert torch.isfinite(out.logits).all() and gc.plans[0].num_tokens < gc.plans[0].num_tokens_full
    assert torch.equal(ref, got)


def test_sdpa_and_eager_give_the_same_plan(ov_dir):
    from globalcom2.loading import load_tiny_family

    plans = {}
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES[:8])]
    for impl in ("sdpa", "eager"):
        model, processor = load_tiny_family(ov_dir, attn_implementation=impl)
        with globalcom2.apply(model, processor, ratio=0.25) as gc:
            inputs = processor(images=images, text=[PROMPT] * 8, return_tensors="pt", padding=True)
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            plans[impl] = gc.plans
    for a, b in zip(plans["sdpa"], plans["eager"], strict=True):
        assert torch.equal(a.thumbnail_mask, b.thumbnail_mask) and torch.equal(
            _kept_tokens(a), _kept_tokens(b)
        )


def test_cls_tower_with_default_strategy(tmp_path, monkeypatch):
    """OneVision with a [CLS] tower ('default' strategy): [CLS] scores by default, counts still match."""
    from globalcom2.adapters import family
    from globalcom2.demo.tiny_families import build_tiny_llava_onevision
    from globalcom2.loading import load_tiny_family

    model, processor = load_tiny_family(build_tiny_llava_onevision(tmp_path / "ov_clip", vision="clip"))
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES[3:10])]
    texts = [PROMPT] * len(images)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    hs, _, packed_full, counts = _raw(model, inputs)
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
    heads = model.config.vision_config.num_attention_heads
    plain = plain_cls_logits(hs[-2], layer.layer_norm1, layer.self_attn.q_proj, layer.self_attn.k_proj, heads)
    g = _g(model)
    used = spy(monkeypatch, family, "cls_scores_from_qk")  # from the last layer's own q/k (it runs: layer -1)
    with globalcom2.apply(model, processor, ratio=0.25, mode="reference") as gc:
        assert gc.adapter.importance == "cls"
        with torch.no_grad():
            packed = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        torch.testing.assert_close(used[0], plain, rtol=1e-5, atol=1e-5)
        scores = used[0]
        start = 0
        for k, size in enumerate(SIZES[3:10]):
            s = scores[start : start + counts[k]].numpy()
            start += counts[k]
            t_mask, t_order, _, keep, _ = plain_onevision(
                s[0], s[1:], _grid(model, size), size, g, 0.25, "softmax-sum", "holistic"
            )
            assert np.array_equal(_kept_tokens(gc.plans[k]).numpy(), keep), size
            torch.testing.assert_close(packed[k], packed_full[k][plain_onevision_sequence(t_order, keep, g)])
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2


# -- errors ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_leave_the_model_unpatched(ov, tiny):
    model, processor = ov
    _, next_processor = tiny
    with pytest.raises(TypeError, match="processor must be a LlavaOnevisionProcessor"):
        globalcom2.apply(model, next_processor, ratio=0.5)
    with pytest.raises(ValueError, match="needs a vision tower with a \\[CLS\\] token"):
        globalcom2.apply(model, processor, ratio=0.5, importance="cls")
    with pytest.raises(ValueError, match="needs the processor"):
        globalcom2.apply(model, None, ratio=0.5)
    processor.vision_aspect_ratio = "anyres_max_4"
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        globalcom2.apply(model, processor, ratio=0.5)
    processor.vision_aspect_ratio = "anyres_max_9"
    assert not {"pack_image_features", "get_image_features"} & set(model.model.__dict__)
    assert "_get_number_of_features" not in processor.__dict__
    globalcom2.apply(model, processor, ratio=0.5).remove()


def test_overlay_of_a_downsampled_plan(ov):
    from globalcom2.workflows import plan_for_image, render_plan

    model, processor = ov
    image = random_image(320, 336)
    plan = plan_for_image(model, processor, image, ratio=0.25)
    pic = render_plan(image, plan, model, "tiny OneVision")
    assert pic.width > 200 and plan.num_tokens < plan.num_tokens_full


# -- Eq. 7 on LLaVA-NeXT: the [CLS] vs cosine ablation on one model ----------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_llava_next_cosine_importance_is_eq7_on_the_feature_layer(tiny, monkeypatch, ratio):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from globalcom2.adapters import family
    from globalcom2.adapters.llava_next import image_grid

    model, processor = tiny
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    sizes = [(100, 180), (180, 100), (150, 150), (61, 183), (300, 310)]
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    inputs = processor(images=images, text=[PROMPT] * len(sizes), return_tensors="pt", padding=True)
    counts = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes
    ]
    pv = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], counts, strict=True)])
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
    plain = plain_cosine(hs[cfg.vision_feature_layer][:, 1:])  # the selected layer, [CLS] dropped ('default')
    used = spy(monkeypatch, family, "cosine_scores")
    masks = {}
    for importance in ("cosine", "cls"):
        with globalcom2.apply(model, processor, ratio=ratio, mode="reference", importance=importance) as gc:
            with torch.no_grad():
                model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            masks[importance] = [p.crops_mask for p in gc.plans]
            if importance == "cosine":
                np.testing.assert_allclose(used[0].numpy(), plain, atol=2e-6)
                scores = used[0].numpy()  # replay the selection from the scores the library used (see above)
                start = 0
                for k, size in enumerate(sizes):
                    s = scores[start : start + counts[k]]
                    start += counts[k]
                    grid = image_grid(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                    t_mask, c_mask, *_ = plain_reference(s[0], s[1:], grid, size, ratio)
                    assert np.array_equal(gc.plans[k].thumbnail_mask.numpy(), t_mask), size
                    assert np.array_equal(gc.plans[k].crops_mask.numpy(), c_mask), size
                    seq = plain_sequence(gc.plans[k].thumbnail_order.tolist(), c_mask, grid, gc.plans[k].valid_box,
                                         g, "reference")  # fmt: skip
                    assert len(seq) == gc.plans[k].num_tokens
    # The ablation is real: the two importance measures keep different tokens on the same model.
    assert any(not torch.equal(a, b) for a, b in zip(masks["cosine"], masks["cls"], strict=True))
    # Budget mode with cosine: processor count == features.
    with globalcom2.apply(model, processor, ratio=ratio, importance="cosine") as gc:
        inputs = processor(images=images, text=[PROMPT] * len(sizes), return_tensors="pt", padding=True)
        out = model(**inputs)
        assert torch.isfinite(out.logits).all()
        n_img = (inputs["input_ids"] == cfg.image_token_id).sum(1).tolist()
        assert n_img == [p.num_tokens for p in gc.plans]


# -- the command line (real subprocesses) ------------------------------------------------------------------------------
def test_cli_visualize_on_a_tiny_onevision_checkpoint(ov_dir, tmp_path):
    from tests.test_cli import run_cli

    photo, out = tmp_path / "photo.png", tmp_path / "kept.png"
    random_image(320, 336, seed=3).save(photo)
    res = run_cli("visualize", "--model", str(ov_dir), "--image", str(photo), "--ratios", "0.5,0.1",
                  "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    plans = json.loads(res.stdout)["plans"]
    assert plans[1]["num_tokens"] < plans[0]["num_tokens"] < plans[0]["num_tokens_full"]
    assert plans[0]["token_grid"] == [20, 21]  # the down-sampled 6x6 grid
    assert out.stat().st_size > 5_000


@pytest.mark.slow
def test_cli_visualize_onevision_standin(tmp_path):
    """`visualize --model standin --family llava_onevision`: DINOv2 at 378 px (27x27 grid), Eq. 7 scores."""
    plan = visualize_standin_plan("llava_onevision", tmp_path / "kept.png", "--importance", "cosine")
    if "token_grid" in plan:  # down-sampled crop grid
        h, w = plan["token_grid"]
        area = h * w
    else:  # the unpadded crop grid itself: its cells are the crops' valid tokens
        area = sum(plan["crop_valid_counts"])
        h = plan["num_tokens_full"] - 27 * 27 - area
        assert h > 0 and area % h == 0
    assert plan["grid"] == [2, 2] and plan["num_tokens_full"] == 27 * 27 + area + h
    assert plan["num_tokens"] == int(729 * 0.25) + int(0.25 * area) + h
