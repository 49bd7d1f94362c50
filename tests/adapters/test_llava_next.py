"""GlobalCom² on a real (tiny, random) LlavaNextForConditionalGeneration loaded with from_pretrained."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import globalcom2
from tests.conftest import PROMPT, random_image
from tests.core.reference_plain import plain_cls_logits, plain_reference, plain_sequence, unpad_box

# (height, width): wide, tall, square, extreme aspect, tiny, odd sizes.
SIZES = [
    (64, 64), (100, 180), (180, 100), (150, 150), (40, 200), (200, 40),
    (120, 130), (300, 310), (90, 250), (250, 90), (33, 77), (61, 183),
]  # fmt: skip
RATIOS = (0.5, 0.25, 0.1)


def _grid(model, size):
    from globalcom2.adapters.llava_next import image_grid

    return image_grid(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)


def _num_image_tokens(model, inputs):
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def _plain_budget_count(size, grid, g, ratio):
    """Budget-mode image tokens written out: int(N*R) + int(R * h*w) + h for the h x w unpadded crop grid."""
    top, bottom, left, right = unpad_box(size[0], size[1], grid[0] * g, grid[1] * g)
    h, w = bottom - top, right - left
    return int(g * g * ratio) + int(ratio * (h * w)) + h


def _raw_tile_outputs(model, inputs):
    """Per-tile scores input and HF's own packed sequences (what the unpatched model hands the LLM per image:
    thumbnail tokens, then the unpadded crop rows each followed by the newline), bypassing the patched code."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    counts = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"]
    ]
    pv = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], counts, strict=True)])
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
        feats = torch.split(model.model.multi_modal_projector(hs[cfg.vision_feature_layer][:, 1:]), counts)
        packed, _ = type(model.model).pack_image_features(
            model.model, feats, inputs["image_sizes"], cfg.vision_feature_select_strategy,
            image_newline=model.model.image_newline,
        )  # fmt: skip
    return hs[-2], packed, counts


@pytest.mark.parametrize("ratio", RATIOS)
def test_budget_counts_processor_equals_features_equals_formula(tiny, ratio):
    model, processor = tiny
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    gc = globalcom2.apply(model, processor, ratio=ratio)
    for i, size in enumerate(SIZES):
        inputs = processor(images=[random_image(*size, seed=i)], text=[PROMPT], return_tensors="pt")
        expected = _plain_budget_count(size, _grid(model, size), g, ratio)
        assert gc.adapter.num_image_tokens(*size) == expected, size
        with torch.no_grad():
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        assert _num_image_tokens(model, inputs) == [expected], size
        assert feats[0].shape[0] == expected == gc.plans[0].num_tokens, size
    gc.remove()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("score", ["logits", "softmax"])
def test_reference_mode_through_the_model_matches_plain(tiny, ratio, score):
    """Scores, masks and the emitted feature sequence all equal the plain re-implementation."""
    model, processor = tiny
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
    heads = model.config.vision_config.num_attention_heads
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for allocation in ("softmax-sum", "softmax-max", "topk-count", "uniform"):
        for scoring in ("holistic", "local", "global"):
            gc = globalcom2.apply(
                model,
                processor,
                ratio=ratio,
                mode="reference",
                allocation=allocation,
                scoring=scoring,
                score=score,
            )
            images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
            inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
            with torch.no_grad():
                packed = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output
            hidden, packed_full, counts = _raw_tile_outputs(model, inputs)
            scores = plain_cls_logits(hidden, layer.layer_norm1, layer.self_attn.q_proj, layer.self_attn.k_proj, heads,
                                      softmax=score == "softmax")  # fmt: skip
            start = 0
            for k, size in enumerate(SIZES):
                grid = _grid(model, size)
                s = scores[start : start + counts[k]].numpy()
                start += counts[k]
                t_mask, c_mask, r, t_order, _ = plain_reference(
                    s[0], s[1:], grid, size, ratio, allocation, scoring
                )
                plan = gc.plans[k]
                where = f"{size} R={ratio} {allocation} {scoring} {score}"
                assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask), where
                assert np.array_equal(plan.crops_mask.numpy(), c_mask), where
                seq = plain_sequence(t_order, c_mask, grid, plan.valid_box, g, "reference")
                assert plan.num_tokens == len(seq), where
                # HF's own packed sequence, with the image_newline row appended that the official order points at
                full = torch.cat([packed_full[k], model.model.image_newline[None].to(packed_full[k])])
                torch.testing.assert_close(packed[k], full[seq], msg=where)
            gc.remove()


def test_budget_sequence_is_raster_order(tiny):
    model, processor = tiny
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    gc = globalcom2.apply(model, processor, ratio=0.25)
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES[:6])]
    inputs = processor(images=images, text=[PROMPT] * 6, return_tensors="pt", padding=True)
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    _, packed_full, _ = _raw_tile_outputs(model, inputs)
    for k, plan in enumerate(gc.plans):
        order = plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()
        seq = plain_sequence(order, plan.crops_mask.tolist(), plan.grid, plan.valid_box, g, "budget")
        torch.testing.assert_close(packed[k], packed_full[k][seq])
        # Thumbnail keeps int(N*R), crops keep int(R * sum N_j) split by r_j.
        assert int(plan.thumbnail_mask.sum()) == int(g * g * 0.25)
        assert int(plan.crops_mask.sum()) == int(0.25 * int(plan.crop_valid_counts.sum()))
    gc.remove()


def test_context_manager_and_generate_forward(tiny):
    model, processor = tiny
    img = random_image(120, 200)
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        inputs = processor(images=[img], text=[PROMPT], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        # Plain forward with labels (log-likelihood scoring) works unchanged.
        labels = inputs["input_ids"].clone()
        labels[labels == model.config.image_token_id] = -100
        res = model(**inputs, labels=labels)
        assert torch.isfinite(res.loss)
        assert gc.plans[0].num_tokens < gc.plans[0].num_tokens_full
    assert "pack_image_features" not in model.model.__dict__


def test_reference_generate_returns_callers_prompt(tiny):
    model, processor = tiny
    img = random_image(120, 200)
    inputs = processor(images=[img], text=[PROMPT], return_tensors="pt")
    with globalcom2.apply(model, processor, ratio=0.25, mode="reference") as gc:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        plan = gc.plans[0]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert plan.num_tokens < plan.num_tokens_full


def test_sdpa_and_eager_vision_attention_give_the_same_plan(tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    plans = {}
    for impl in ("sdpa", "eager"):
        model, processor = load_tiny(tiny_clip_dir, attn_implementation=impl)
        assert model.model.vision_tower.config._attn_implementation == impl
        images = [random_image(*s, seed=k) for k, s in enumerate(SIZES[:5])]
        with globalcom2.apply(model, processor, ratio=0.25) as gc:
            inputs = processor(images=images, text=[PROMPT] * 5, return_tensors="pt", padding=True)
            model(**inputs)
            plans[impl] = gc.plans
    for a, b in zip(plans["sdpa"], plans["eager"], strict=True):
        assert torch.equal(a.thumbnail_mask, b.thumbnail_mask)
        assert torch.equal(a.crops_mask, b.crops_mask)


def test_pipeline_image_text_to_text(tiny):
    from transformers import pipeline

    model, processor = tiny
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        out = pipe(images=random_image(100, 180), text=PROMPT, max_new_tokens=3, do_sample=False)
        assert isinstance(out, list) and "generated_text" in out[0]
        assert gc.plans and gc.plans[0].num_tokens < gc.plans[0].num_tokens_full


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"ratio": 0.0}, ValueError, "`ratio` must be in (0, 1]"),
        ({"ratio": -0.5}, ValueError, "`ratio` must be in (0, 1]"),
        ({"ratio": 1.5}, ValueError, "`ratio` must be in (0, 1]"),
        ({"ratio": math.nan}, ValueError, "`ratio` must be finite"),
        ({"ratio": "0.5"}, TypeError, "`ratio` must be a real number"),
        ({"ratio": 0.5, "mode": "fast"}, ValueError, "`mode` must be one of"),
        ({"ratio": 0.5, "allocation": "max"}, ValueError, "`allocation` must be one of"),
        ({"ratio": 0.5, "tau": 0}, ValueError, "`tau` must be > 0"),
        ({"ratio": 0.5, "colour": "red"}, TypeError, "unknown GlobalCom² option"),
    ],
)
def test_bad_options_leave_model_unpatched(tiny, kwargs, exc, words):
    model, processor = tiny
    with pytest.raises(exc) as err:
        globalcom2.apply(model, processor, **kwargs)
    assert words in str(err.value)
    assert "pack_image_features" not in model.model.__dict__
    assert "_get_number_of_features" not in processor.__dict__


def test_unsupported_model_and_processor(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, processor = tiny
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=50))  # fmt: skip
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM"):
        globalcom2.apply(llm, processor, ratio=0.5)
    with pytest.raises(TypeError, match="processor must be a LlavaNextProcessor"):
        globalcom2.apply(model, processor.tokenizer, ratio=0.5)
    with pytest.raises(ValueError, match="needs the processor"):
        globalcom2.apply(model, None, ratio=0.5)
    assert "pack_image_features" not in model.model.__dict__


def test_apply_twice_is_an_error(tiny):
    model, processor = tiny
    gc = globalcom2.apply(model, processor, ratio=0.5)
    with pytest.raises(ValueError, match="already applied"):
        globalcom2.apply(model, processor, ratio=0.25)
    assert gc.config.ratio == 0.5  # the first handle still rules
    gc.remove()
    globalcom2.apply(model, processor, ratio=0.25).remove()
