"""Bad input to the public API: one clear line naming the argument, and model/processor left untouched.

Complements tests/adapters/test_llava_next.py (which covers the basic ratio/option/model/processor errors).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.config import GlobalComConfig
from tests.conftest import PROMPT, random_image


def _untouched(model, processor) -> bool:
    inner = model.model.__dict__
    return (
        "pack_image_features" not in inner
        and "get_placeholder_mask" not in inner
        and "_get_number_of_features" not in processor.__dict__
        and "_globalcom2_handle" not in model.__dict__
    )


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# -- options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, exc, words",
    [
        (0, ValueError, "`ratio` must be in (0, 1], got 0"),
        (-0.25, ValueError, "`ratio` must be in (0, 1], got -0.25"),
        (1.0000001, ValueError, "`ratio` must be in (0, 1]"),
        (math.nan, ValueError, "`ratio` must be finite and in (0, 1], got nan"),
        (math.inf, ValueError, "`ratio` must be finite and in (0, 1], got inf"),
        (-math.inf, ValueError, "`ratio` must be finite and in (0, 1]"),
        ("0.5", TypeError, "`ratio` must be a real number in (0, 1], got str '0.5'"),
        (True, TypeError, "`ratio` must be a real number in (0, 1], got bool"),
        ([0.5], TypeError, "`ratio` must be a real number in (0, 1], got list"),
        (torch.tensor(0.5), TypeError, "`ratio` must be a real number in (0, 1], got Tensor"),
        (complex(0.5, 0), TypeError, "`ratio` must be a real number in (0, 1]"),
    ],
)
def test_ratio_errors_name_the_argument_and_range(value, exc, words):
    with pytest.raises(exc) as err:
        GlobalComConfig(ratio=value)
    assert words in _one_line(err.value)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, np.float32(0.25), np.float64(0.1), 1e-9])
def test_accepted_ratios_become_python_floats(value):
    cfg = GlobalComConfig(ratio=value)
    assert type(cfg.ratio) is float and cfg.ratio == float(value)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"alpha": -0.1}, ValueError, "`alpha` must be in [0, 1]"),
        ({"alpha": 1.5}, ValueError, "`alpha` must be in [0, 1]"),
        ({"alpha": math.nan}, ValueError, "`alpha` must be finite and in [0, 1]"),
        ({"alpha": "half"}, TypeError, "`alpha` must be a real number in [0, 1]"),
        ({"tau": 0.0}, ValueError, "`tau` must be > 0"),
        ({"tau": -3}, ValueError, "`tau` must be > 0"),
        ({"tau": math.inf}, ValueError, "`tau` must be finite and > 0"),
        ({"tau": None}, TypeError, "`tau` must be a real number > 0"),
        ({"mode": "Budget"}, ValueError, "`mode` must be one of 'budget', 'reference'; got 'Budget'"),
        ({"mode": None}, ValueError, "`mode` must be one of 'budget', 'reference'; got None"),
        ({"allocation": "softmax"}, ValueError, "`allocation` must be one of 'softmax-sum', 'softmax-max'"),
        ({"scoring": 1}, ValueError, "`scoring` must be one of 'holistic', 'local', 'global'; got 1"),
        ({"score": "attention"}, ValueError, "`score` must be one of 'logits', 'softmax'"),
        ({"importance": "saliency"}, ValueError, "`importance` must be one of 'auto', 'cls', 'cosine'"),
        ({"ratios": 0.5}, TypeError, "unknown GlobalCom² option(s) ['ratios']"),
    ],
)
def test_other_option_errors(kwargs, exc, words):
    with pytest.raises(exc) as err:
        GlobalComConfig.from_kwargs(None, **{"ratio": 0.5, **kwargs})
    assert words in _one_line(err.value)


def test_positional_ratio_and_bad_config_object(tiny):
    model, processor = tiny
    with pytest.raises(TypeError) as err:
        globalcom2.apply(model, processor, 0.25)  # the third positional argument is `config`
    assert "`config` must be a GlobalComConfig or None, got float 0.25" in _one_line(err.value)
    assert "ratio=" in str(err.value)
    with pytest.raises(TypeError, match="`config` must be a GlobalComConfig or None, got dict"):
        globalcom2.apply(model, processor, {"ratio": 0.25})
    assert _untouched(model, processor)
    # A config object plus keyword overrides is fine.
    with globalcom2.apply(model, processor, GlobalComConfig(ratio=0.5, tau=5.0), ratio=0.25) as gc:
        assert gc.config.ratio == 0.25 and gc.config.tau == 5.0


# -- models and processors ------------------------------------------------------------------------------------
def test_unsupported_models_and_processors(tiny):
    from transformers import LlavaNextForConditionalGeneration

    model, processor = tiny
    cases = [
        (lambda: globalcom2.apply(None, processor, ratio=0.5), TypeError, "unsupported model class NoneType"),
        (lambda: globalcom2.apply(torch.nn.Linear(2, 2), processor, ratio=0.5), TypeError,
         "unsupported model class Linear; GlobalCom² supports "),
        (lambda: globalcom2.apply(processor, model, ratio=0.5), TypeError,
         "unsupported model class LlavaNextProcessor"),  # arguments swapped
        (lambda: globalcom2.apply(model, processor.image_processor, ratio=0.5), TypeError,
         "processor must be a LlavaNextProcessor for LlavaNextForConditionalGeneration, got LlavaNextImageProcessorPil"),
        (lambda: globalcom2.apply(model.model, processor, ratio=0.5), TypeError,
         "unsupported model class LlavaNextModel"),  # the inner model, not the ...ForConditionalGeneration
    ]  # fmt: skip
    for call, exc, words in cases:
        with pytest.raises(exc) as err:
            call()
        assert words in _one_line(err.value)
        if words.startswith("unsupported model class"):  # the message names every supported class
            for name in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                         "InternVLForConditionalGeneration"):  # fmt: skip
                assert name in str(err.value), (words, str(err.value))
    # Subclasses are refused too: they may pack features differently (the adapter matches the exact class).
    sub = type("MyLlavaNext", (LlavaNextForConditionalGeneration,), {})
    model.__class__ = sub
    try:
        with pytest.raises(TypeError, match="unsupported model class MyLlavaNext"):
            globalcom2.apply(model, processor, ratio=0.5)
    finally:
        model.__class__ = LlavaNextForConditionalGeneration
    assert _untouched(model, processor)


def test_full_feature_strategy_is_refused(tiny):
    model, processor = tiny
    model.config.vision_feature_select_strategy = "full"
    processor.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError) as err:
        globalcom2.apply(model, processor, ratio=0.5)
    assert "vision_feature_select_strategy='full' is not supported" in _one_line(err.value)
    assert _untouched(model, processor)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda p: setattr(p.image_processor, "image_grid_pinpoints", [[64, 128], [128, 64]]),
         "processor/model mismatch: image_grid_pinpoints differ"),
        (lambda p: setattr(p, "patch_size", 16), "processor/model mismatch: patch_size 16 vs 8"),
        (lambda p: setattr(p.image_processor, "crop_size", {"height": 32, "width": 32}),
         "processor/model mismatch: the image processor cuts 32x32 px tiles, the vision tower takes 64x64"),
        (lambda p: setattr(p, "image_token_id", 3), "processor/model mismatch: image_token_id 3 vs 4"),
        (lambda p: setattr(p, "vision_feature_select_strategy", "full"),
         "processor/model mismatch: vision_feature_select_strategy 'full' vs 'default'"),
    ],
    ids=["pinpoints", "patch-size", "crop-size", "image-token", "strategy"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_processor_model_mismatch(tiny, mutate, words, mode):
    model, processor = tiny
    mutate(processor)
    with pytest.raises(ValueError) as err:
        globalcom2.apply(model, processor, ratio=0.5, mode=mode)
    assert words in _one_line(err.value)
    assert _untouched(model, processor)


# -- apply twice / remove twice ----------------------------------------------------------------------------
def test_apply_twice_in_every_combination(tiny, tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    model, processor = tiny
    other_processor = copy.deepcopy(processor)
    gc = globalcom2.apply(model, processor, ratio=0.5)
    with pytest.raises(ValueError, match="already applied to this model; call .remove"):
        globalcom2.apply(model, other_processor, ratio=0.25)  # same model, another processor
    assert "_get_number_of_features" not in other_processor.__dict__
    # Same processor, another model: refused (the processor's count belongs to the first handle).
    model2, _ = load_tiny(tiny_clip_dir)
    with pytest.raises(ValueError, match="already applied to this processor"):
        globalcom2.apply(model2, processor, ratio=0.25)
    assert "pack_image_features" not in model2.model.__dict__
    # The failed calls changed nothing: the first handle still compresses at R = 0.5.
    inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    assert gc.plans[0].num_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert gc.plans[0].num_tokens < gc.plans[0].num_tokens_full
    gc.remove()
    assert _untouched(model, processor)


def test_remove_twice_and_stale_handles_are_noops(tiny):
    model, processor = tiny
    first = globalcom2.apply(model, processor, ratio=0.5)
    first.remove()
    first.remove()  # documented no-op
    second = globalcom2.apply(model, processor, ratio=0.1)
    first.remove()  # a stale handle must not undo the live one
    assert "pack_image_features" in model.model.__dict__ and "_get_number_of_features" in processor.__dict__
    inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    assert second.plans and not first.plans
    second.remove()
    assert _untouched(model, processor)
    assert "active" not in repr(second) and "removed" in repr(second)


def test_context_manager_removes_on_error(tiny):
    model, processor = tiny
    with pytest.raises(RuntimeError, match="boom"), globalcom2.apply(model, processor, ratio=0.25):
        raise RuntimeError("boom")
    assert _untouched(model, processor)


# -- prompts whose placeholders do not match the images --------------------------------------------------------
def test_inputs_made_before_apply_give_a_clear_error(tiny):
    model, processor = tiny
    inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")  # before apply
    full = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        for call in (lambda: model(**inputs), lambda: model.generate(**inputs, max_new_tokens=2)):
            with pytest.raises(ValueError) as err:
                call()
            msg = _one_line(err.value)
            expected = gc.plans[0].num_tokens
            assert f"the prompts hold {full} image tokens but the images give {expected} features" in msg
            assert "call the processor again after apply()" in msg and "GlobalCom² (mode='budget'" in msg
        # Re-running the processor after apply() fixes it.
        fixed = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
        assert (
            model.generate(**fixed, max_new_tokens=2, do_sample=False).shape[1]
            == fixed["input_ids"].shape[1] + 2
        )


def test_our_check_holds_even_when_hf_disables_its_own(tiny, monkeypatch):
    """HF's count check can be switched off by an environment variable; ours cannot (no silent wrong tokens)."""
    model, processor = tiny
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    images = [random_image(100, 180), random_image(150, 150, seed=1)]
    # Prompts made for R = 0.5 fed to a model compressed at R = 0.1: more placeholders than features.
    with globalcom2.apply(model, processor, ratio=0.5):
        inputs = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
    with globalcom2.apply(model, processor, ratio=0.1), pytest.raises(ValueError, match="the prompts hold"):
        model(**inputs)
    with torch.no_grad(), pytest.raises(ValueError, match="the prompts hold"):  # inputs_embeds path too
        with globalcom2.apply(model, processor, ratio=0.1):
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                  attention_mask=inputs["attention_mask"])  # fmt: skip


def test_placeholder_runs_must_line_up_with_the_images(tiny):
    """Same total, wrong split (text made for images [A, B], pixels of [B, A]): refused, not scattered."""
    model, processor = tiny
    a, b = random_image(100, 180), random_image(200, 60, seed=1)
    for mode in ("budget", "reference"):
        with globalcom2.apply(model, processor, ratio=0.25, mode=mode):
            ab = processor(images=[a, b], text=[PROMPT] * 2, return_tensors="pt", padding=True)
            ba = processor(images=[b, a], text=[PROMPT] * 2, return_tensors="pt", padding=True)
            assert int((ab["input_ids"] == model.config.image_token_id).sum()) == int(
                (ba["input_ids"] == model.config.image_token_id).sum()
            )
            mixed = {**ab, "pixel_values": ba["pixel_values"], "image_sizes": ba["image_sizes"]}
            with pytest.raises(ValueError) as err:
                model(**mixed)
            assert "do not line up with the images' token counts" in _one_line(err.value), mode
            model(**ab)  # the consistent inputs work


def test_reference_mode_with_budget_prompts_is_a_clear_error(tiny):
    model, processor = tiny
    with globalcom2.apply(model, processor, ratio=0.25):
        inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with globalcom2.apply(model, processor, ratio=0.25, mode="reference"), pytest.raises(ValueError) as err:
        model.generate(**inputs, max_new_tokens=2)
    msg = _one_line(err.value)
    assert "GlobalCom² (mode='reference')" in msg and "build the inputs with the plain processor" in msg


def test_after_remove_compressed_prompts_are_refused_by_hf(tiny):
    """Prompts made while patched, run after remove(): HF's own check refuses them (nothing of ours is left)."""
    model, processor = tiny
    with globalcom2.apply(model, processor, ratio=0.25):
        inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**inputs)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_image_and_placeholder_counts_must_match_in_the_text(tiny, mode):
    model, processor = tiny
    img = random_image(100, 180)
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode):
        for images, text in (([img, img], [PROMPT]), ([img], ["USER: <image><image> hi"]), ([img], ["hi"])):
            try:
                inputs = processor(images=images, text=text, return_tensors="pt")
            except (ValueError, StopIteration) as err:  # transformers >= 5.20 checks in the processor
                assert isinstance(err, StopIteration) or "<image>" in str(err)
                continue
            with pytest.raises(ValueError, match="the prompts hold"):  # 5.19: our check in the model
                model(**inputs)
        # Text-only calls pass straight through.
        ids = processor(text=["USER: hello ASSISTANT:"], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 2
