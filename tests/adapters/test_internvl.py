"""GlobalCom² on a real (tiny, random) InternVLForConditionalGeneration loaded with from_pretrained."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import globalcom2
from globalcom2.adapters.internvl import GRID_KEY
from tests.adapters.families import standin_tower_or_skip, visualize_standin_plan
from tests.adapters.plain_families import (
    plain_cosine,
    plain_internvit_cls_logits,
    plain_internvl_sequence,
    plain_onevision,
    plain_pool_2x2,
    spy,
)
from tests.conftest import random_image
from tests.core.reference_plain import stable_top

# (height, width) -> crop grids 1x1 (single tile), 1x2, 2x1, 2x2, 1x5, 5x1, 2x3, 3x2, 1x6, 6x1, 1x4, 3x1
SIZES = [
    (112, 112), (100, 180), (180, 100), (224, 224), (60, 300), (300, 60),
    (200, 300), (300, 200), (100, 600), (600, 100), (50, 200), (400, 130),
]  # fmt: skip
PROMPT = "USER: <IMG_CONTEXT>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


@pytest.fixture(scope="module")
def iv_dir(checkpoint):
    from globalcom2.demo.tiny_families import build_tiny_internvl

    return checkpoint(build_tiny_internvl)


@pytest.fixture()
def iv(iv_dir):
    from globalcom2.loading import load_tiny_family

    return load_tiny_family(iv_dir)


def _g(model) -> int:
    vc = model.config.vision_config
    return vc.image_size[0] // vc.patch_size[0] // 2


def _tiles(rows: int, cols: int) -> int:
    return 1 if rows * cols == 1 else rows * cols + 1


def _raw_features(model, pixel_values) -> torch.Tensor:
    """HF's own (T, N, D) tile features, bypassing the instance patch."""
    with torch.no_grad():
        return type(model.model).get_image_features(model.model, pixel_values, return_dict=True).pooler_output


def _mosaic_error(tiles: torch.Tensor, rows: int, cols: int) -> float:
    """How far the crops, laid out as rows x cols and shrunk to one tile, are from the thumbnail."""
    crops, thumb = tiles[:-1], tiles[-1]
    c, t = crops.shape[1], crops.shape[-1]
    mosaic = crops.reshape(rows, cols, c, t, t).permute(2, 0, 3, 1, 4).reshape(1, c, rows * t, cols * t)
    small = F.interpolate(mosaic, size=(t, t), mode="area")[0]
    return float((small - thumb).abs().mean())


# -- the tile grid channel and the counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_tile_grids_and_budget_counts(iv, ratio):
    model, processor = iv
    n = _g(model) ** 2
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    full = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
    with globalcom2.apply(model, processor, ratio=ratio) as gc:
        inputs = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], **{GRID_KEY: inputs[GRID_KEY]})
        serving = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
        plans = list(gc.plans)
    grids = inputs[GRID_KEY].tolist()
    assert inputs[GRID_KEY].shape == (len(SIZES), 2) and GRID_KEY not in full
    assert feats.pooler_output.shape[1:] == (1, model.config.text_config.hidden_size)
    counted = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    full_counts = (full["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert sum(counted) == feats.pooler_output.shape[0]
    offset = 0
    for k, (rows, cols) in enumerate(grids):
        tiles = _tiles(rows, cols)
        expected = int(n * ratio) + (int(ratio * ((tiles - 1) * n)) if tiles > 1 else 0)  # a lone tile: Eq. 2
        assert counted[k] == plans[k].num_tokens == expected == serving[k] - 2, SIZES[k]
        assert full_counts[k] == plans[k].num_tokens_full == tiles * n
        assert plans[k].grid == ((rows, cols) if tiles > 1 else (0, 0))
        if tiles > 1:  # the recovered grid is the arrangement the crops really have
            t = inputs["pixel_values"][offset : offset + tiles]
            errors = {
                (r, c): _mosaic_error(t, r, c) for r in range(1, rows * cols + 1) for c in [rows * cols // r]
                if r * c == rows * cols
            }  # fmt: skip
            assert min(errors, key=errors.__getitem__) == (rows, cols), (SIZES[k], errors)
        offset += tiles
    assert offset == inputs["pixel_values"].shape[0]


# -- scores and selection against the plain re-implementation ------------------------------------------------------
@pytest.mark.parametrize("mode, ratio", [("reference", 0.25), ("budget", 0.1)])
def test_kept_tokens_and_sequence_match_plain(iv, monkeypatch, mode, ratio):
    """[CLS] logits (with q/k RMS norms), their 2x2 pooling, the kept masks and the emitted order equal the plain
    re-implementation. The selection is replayed from the scores the library used (checked against the plain
    scores first), so that a one-ulp float32 difference cannot flip a near-tie."""
    from globalcom2.adapters import family

    model, processor = iv
    g = _g(model)
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    with globalcom2.apply(model, processor, ratio=ratio):  # only for the tile grids
        inputs = processor(images=images, text=[PROMPT] * len(SIZES), return_tensors="pt", padding=True)
    grids = inputs[GRID_KEY].tolist()
    tower = model.model.vision_tower
    with torch.no_grad():
        hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    plain_patch = plain_internvit_cls_logits(
        hs[-2], tower.encoder.layer[-1], tower.config.num_attention_heads
    )
    raw = _raw_features(model, inputs["pixel_values"])
    used = spy(monkeypatch, family, "cls_scores_from_qk")  # per-patch scores from the layer's own q/k
    for allocation in ALLOCATIONS:
        for scoring in ("holistic", "local", "global"):
            gc = globalcom2.apply(
                model, processor, ratio=ratio, mode=mode, allocation=allocation, scoring=scoring
            )
            with torch.no_grad():
                out = model.model.get_image_features(inputs["pixel_values"], **{GRID_KEY: inputs[GRID_KEY]})
            plans = list(gc.plans)
            gc.remove()
            if len(used) == 1:
                torch.testing.assert_close(used[0], plain_patch, rtol=1e-5, atol=1e-5)
            scores = plain_pool_2x2(used[-1].numpy())
            packed, offset, row = out.pooler_output[:, 0], 0, 0
            for k, (rows, cols) in enumerate(grids):
                tiles = _tiles(rows, cols)
                s, table = (
                    scores[offset : offset + tiles],
                    raw[offset : offset + tiles].reshape(-1, raw.shape[-1]),
                )
                offset += tiles
                plan = plans[k]
                if tiles == 1:  # the lone tile is the global view: its own top int(N*R) (the thumbnail rule)
                    top = stable_top(list(s[0]), int(g * g * ratio))
                    assert sorted(top) == plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()
                    seq = top if mode == "reference" else sorted(top)
                else:
                    given = plan.crop_keep_counts.tolist() if mode == "budget" else None
                    size = (rows * g, cols * g)  # no unpadding: the whole crop grid is valid
                    t_mask, t_order, r, keep, ks = plain_onevision(
                        s[-1], s[:-1], (rows, cols), size, g, ratio, allocation, scoring, counts=given
                    )
                    where = f"{SIZES[k]} R={ratio} {mode} {allocation} {scoring}"
                    np.testing.assert_allclose(plan.crop_ratios.numpy(), r, rtol=1e-5, err_msg=where)
                    assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask.reshape(g, g)), where
                    assert np.array_equal(plan.crops_mask.numpy(), keep), where
                    assert plan.crop_keep_counts.tolist() == ks, where
                    order = t_order if mode == "reference" else np.flatnonzero(t_mask)
                    seq = plain_internvl_sequence(order, keep, (rows, cols), g)
                torch.testing.assert_close(packed[row : row + len(seq)], table[seq])
                row += len(seq)
            assert row == packed.shape[0]


def test_cosine_importance_is_eq7_on_the_merged_tokens(iv, monkeypatch):
    from globalcom2.adapters import family

    model, processor = iv
    g = _g(model)
    sizes = SIZES[1:8]
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    used = spy(monkeypatch, family, "cosine_scores")
    with globalcom2.apply(model, processor, ratio=0.25, mode="reference", importance="cosine") as gc:
        inputs = processor(images=images, text=[PROMPT] * len(sizes), return_tensors="pt", padding=True)
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], **{GRID_KEY: inputs[GRID_KEY]})
            last = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state[:, 1:]
            t, p, d = last.shape
            side = int(p**0.5)
            merged = model.model.pixel_shuffle(last.reshape(t, side, side, d)).reshape(t, g * g, -1)
        np.testing.assert_allclose(used[0].numpy(), plain_cosine(merged), atol=2e-6)
        offset = 0
        for k, (rows, cols) in enumerate(inputs[GRID_KEY].tolist()):
            tiles = _tiles(rows, cols)
            s = used[0][offset : offset + tiles].numpy()
            offset += tiles
            t_mask, _, _, keep, _ = plain_onevision(
                s[-1], s[:-1], (rows, cols), (rows * g, cols * g), g, 0.25, "softmax-sum", "holistic"
            )
            assert np.array_equal(gc.plans[k].crops_mask.numpy(), keep), sizes[k]


# -- the model end to end --------------------------------------------------------------------------------------------
def test_beam_search_keeps_each_sample_with_its_own_image(iv):
    """generate() expands pre-encoded image features per sample; one row per kept token keeps that correct."""
    model, processor = iv
    images = [random_image(200, 300), random_image(100, 180, seed=1)]
    with globalcom2.apply(model, processor, ratio=0.25):
        batch = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
        for k, img in enumerate(images):
            single = processor(images=[img], text=[PROMPT], return_tensors="pt")
            o = model.generate(**single, max_new_tokens=4, num_beams=2, do_sample=False)
            assert (
                o[0, single["input_ids"].shape[1] :].tolist()
                == out[k, batch["input_ids"].shape[1] :].tolist()
            )


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_and_forward_with_labels(iv, mode):
    model, processor = iv
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as gc:
        inputs = processor(images=[random_image(200, 300)], text=[PROMPT], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        labels = inputs["input_ids"].clone()
        labels[labels == model.config.image_token_id] = -100
        res = model(**inputs, labels=labels)
        assert torch.isfinite(res.loss)
        assert gc.plans[0].num_tokens < gc.plans[0].num_tokens_full


def test_inputs_without_grids_pass_through_uncompressed(iv):
    model, processor = iv
    images = [random_image(200, 300)]
    early = processor(images=images, text=[PROMPT], return_tensors="pt")  # made before apply(): full count
    with torch.no_grad():
        ref = model(**early).logits
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                got = model(**early).logits
        assert gc.plans == [] and any("no tile grids" in str(w.message) for w in caught)
        # Tiles the grids do not account for (e.g. video frames mixed in): refused, not guessed.
        inputs = processor(images=images, text=[PROMPT], return_tensors="pt")
        extra = torch.cat([inputs["pixel_values"], inputs["pixel_values"][:1]])
        with pytest.raises(NotImplementedError, match="mixes videos and images"):
            model.model.get_image_features(extra, **{GRID_KEY: inputs[GRID_KEY]})
    assert torch.equal(ref, got)


def test_sdpa_and_eager_give_the_same_plan(iv_dir):
    from globalcom2.loading import load_tiny_family

    plans = {}
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES[1:7])]
    for impl in ("sdpa", "eager"):
        model, processor = load_tiny_family(iv_dir, attn_implementation=impl)
        with globalcom2.apply(model, processor, ratio=0.25) as gc:
            inputs = processor(images=images, text=[PROMPT] * 6, return_tensors="pt", padding=True)
            model(**inputs)
            plans[impl] = gc.plans
    for a, b in zip(plans["sdpa"], plans["eager"], strict=True):
        assert torch.equal(a.thumbnail_mask, b.thumbnail_mask) and torch.equal(a.crops_mask, b.crops_mask)


def test_bad_inputs_leave_the_model_unpatched(iv, tiny):
    model, processor = iv
    _, next_processor = tiny
    with pytest.raises(TypeError, match="processor must be a InternVLProcessor"):
        globalcom2.apply(model, next_processor, ratio=0.5)
    for mode in ("budget", "reference"):  # the processor carries the tile grids in both modes
        with pytest.raises(
            ValueError, match=f"mode='{mode}' needs the processor: the model never sees the tile"
        ):
            globalcom2.apply(model, None, ratio=0.5, mode=mode)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        globalcom2.apply(model, processor, ratio=0.5)
    model.config.vision_feature_select_strategy = "default"
    assert not {"get_image_features", "get_placeholder_mask"} & set(model.model.__dict__)
    assert not {"_process_images", "replace_image_token"} & set(processor.__dict__)
    globalcom2.apply(model, processor, ratio=0.5).remove()


def test_workflows_plan_and_overlay(iv):
    from globalcom2.workflows import default_prompt, plan_for_image, render_plan

    model, processor = iv
    image = random_image(200, 300)
    plan = plan_for_image(model, processor, image, ratio=0.25)
    assert plan.grid == (2, 3) and plan.num_tokens < plan.num_tokens_full
    pic = render_plan(image, plan, model, "tiny InternVL")
    assert pic.width > 200
    assert "<IMG_CONTEXT>" in default_prompt(processor, "What?")


@pytest.mark.slow
def test_dinov2_standin_as_internvit_matches_dinov2():
    """The stand-in's weights in InternViT give DINOv2's own features (same architecture, one-to-one mapping)."""
    from globalcom2.demo.tiny_families import standin_internvl_vision_model

    dinov2 = standin_tower_or_skip(448)
    internvit = standin_internvl_vision_model(448, dinov2=dinov2)
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = dinov2(x).last_hidden_state
        b = internvit(x).last_hidden_state
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# -- the command line (real subprocesses) ------------------------------------------------------------------------------
def test_cli_ask_on_a_tiny_internvl_checkpoint(iv_dir, tmp_path):
    """Loads through AutoModelForImageTextToText and the processor fallback without torchvision."""
    from tests.test_cli import run_cli

    photo = tmp_path / "photo.png"
    random_image(200, 300, seed=3).save(photo)
    res = run_cli("ask", "--model", str(iv_dir), "--image", str(photo), "--ratio", "0.25", "--max-new-tokens", "3",
                  "--json", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert (
        data["grid"] == [2, 3]
        and data["image_tokens"] < data["image_tokens_full"] == 7 * _g_side(iv_dir) ** 2
    )


@pytest.mark.slow
def test_cli_visualize_internvl_standin(tmp_path):
    """`visualize --model standin --family internvl`: the DINOv2 stand-in as InternViT, a real photo, an overlay."""
    plan = visualize_standin_plan("internvl", tmp_path / "kept.png")
    assert plan["grid"] == [2, 3] and plan["num_tokens_full"] == 7 * 256
    assert plan["num_tokens"] == int(256 * 0.25) + int(0.25 * 6 * 256)


def _g_side(path) -> int:
    config = json.loads((path / "config.json").read_text())
    vc = config["vision_config"]
    return vc["image_size"][0] // vc["patch_size"][0] // 2
