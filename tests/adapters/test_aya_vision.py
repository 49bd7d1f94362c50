"""GlobalCom² on a real (tiny, random) AyaVisionForConditionalGeneration.

The family-generic checks (apply/remove bit-exact, batches, threads, tie rule, error classes) run on it in
test_families.py; here: the counts, the kept sets and the exact sequence (span markers, runs) against a plain
re-implementation of docs/families.md's Aya Vision section, and the model end to end.
"""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.adapters import idefics3 as idefics3_module
from tests.adapters.families import TILING_SIZES, tiny_checkpoint_fixtures
from tests.adapters.plain_families import capture_llm_inputs, plain_cosine, plain_internvl_sequence
from tests.adapters.tiling_checks import (
    TilingFamily,
    check_budget_counts,
    check_generate_with_labels,
    check_llm_reads,
    check_max_image_tokens,
    replay_tiling_plans,
)
from tests.conftest import random_image, sweep

# (height, width): up to 6 crops of 64 px, thumbnail last; square and small images are one tile
SIZES = list(TILING_SIZES)
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


tiny_dir, fam = tiny_checkpoint_fixtures("globalcom2.demo.tiny_tiling:build_tiny_aya_vision")


def _inputs(processor, images, prompts=None):
    prompts = prompts or [PROMPT] * len(images)
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _family(model) -> TilingFamily:
    """Aya's geometry: Eq. 7 on the projector's input (layer -1, before post_layernorm), s x s pixel shuffle."""
    vc = model.config.vision_config
    s = int(model.config.downsample_factor)

    def plain_scores(model, inputs):
        tower = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        return plain_cosine(tower.hidden_states[model.config.vision_feature_layer])

    return TilingFamily(
        _inputs, PROMPT, "<image>", vc.image_size // vc.patch_size // s, s, (idefics3_module, "cosine_scores"),
        idefics3_module, plain_scores, lambda model: capture_llm_inputs(model.model, model.model.language_model),
    )  # fmt: skip


def plain_aya_image_text(crop_counts, thumb_count) -> str:
    """One image's span in an Aya Vision prompt with the given run lengths (HF's documented layout)."""
    patch = "<|IMG_PATCH|>"
    text = "<|START_OF_IMG|>"
    for k, count in enumerate(crop_counts):
        text += f"TILE_{k + 1}" + patch * int(count)
    return text + "TILE_GLOBAL" + patch * int(thumb_count) + "<|END_OF_IMG|>"


@pytest.mark.parametrize("ratio", sweep([0.5, 0.25, 0.1], [0.25]))
def test_processor_count_equals_features_for_many_sizes(fam, ratio):
    """Budget mode: placeholder count == features == int(N*R) + int(R*n*N) for n crops (the plain processor's tile
    count; one tile: int(N*R)); the prompt shrinks by exactly the tokens saved; the serving count is the span."""
    model, processor = fam
    family = _family(model)
    n = family.n
    tiles_of = [int(t) for t in processor.image_processor([random_image(*s) for s in SIZES])["num_patches"]]
    counts = check_budget_counts(family, model, processor, SIZES, ratio)
    with globalcom2.apply(model, processor, ratio=ratio):
        served = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    for k, size in enumerate(SIZES):
        crops = tiles_of[k] - 1
        expected = int(n * ratio) + int(ratio * crops * n)
        assert counts.counted[k] == expected and counts.plans[k].num_tokens_full == tiles_of[k] * n, size
        span = len(
            processor.tokenizer(plain_aya_image_text([0] * crops, 0), add_special_tokens=False)["input_ids"]
        )
        assert served[k] == span + expected, size


@pytest.mark.parametrize("allocation", sweep(ALLOCATIONS, ["softmax-sum", "topk-count"]))
@pytest.mark.parametrize(
    "case", sweep([("reference", 0.25), ("budget", 0.1), ("budget", 0.5)], [("budget", 0.1)])
)
def test_kept_tokens_and_sequence_match_plain(fam, monkeypatch, case, allocation):
    """Eq. 7 on the projector's input, summed per pixel-shuffle group, the kept sets, per-crop counts, the prompt
    the LLM reads (span markers, runs) and the features at every placeholder equal a plain re-implementation on
    1 x n, n x 1 and single-tile images, for every scoring."""
    model, processor = fam
    mode, ratio = case
    family = _family(model)
    token = model.config.image_token_id
    runs = replay_tiling_plans(
        family, model, processor, monkeypatch, mode=mode, ratio=ratio, allocation=allocation
    )
    for run in runs:
        seq = (
            run.order
            if run.keep is None
            else plain_internvl_sequence(run.order, run.keep, run.grid, family.g)
        )
        text = PROMPT.replace("<image>", plain_aya_image_text(run.crop_counts, run.thumb_count))
        check_llm_reads(run, processor, token, text, seq)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_with_labels_and_left_padding(fam, mode):
    model, processor = fam
    check_generate_with_labels(_family(model), model, processor, mode)


@pytest.mark.parametrize("max_tokens", sweep([30, 45, 80], [45]))
def test_max_image_tokens_counts_the_span(fam, max_tokens):
    """Each image's span (markers and runs, as tokenised) is at most T; count == features; too small is refused."""
    model, processor = fam
    check_max_image_tokens(_family(model), model, processor, SIZES[:8], max_tokens)


def test_llm_side_pruning_keeps_the_sliding_window_of_cohere2(fam, tiny_dir):
    """Cohere2's layers attend within a sliding window (64 entries here; these prompts are longer). Regression: the
    pruner gave the layers after a drop a plain causal mask and put a short row's fillers after its tokens, so
    the sliding-window cache kept fillers instead of the row's last tokens and a batch row got other tokens than
    its prompt alone. Now FastV at R = 1 (the pruned path, every token kept) equals the unpatched model, a
    left-padded batch equals each prompt alone, and FastV's scores are the eager model's attention of the last
    token over its window."""
    from globalcom2.loading import load_tiny_family
    from globalcom2.methods import apply_method

    model, processor = fam
    window = model.config.text_config.sliding_window
    images = [random_image(60, 250, seed=1), random_image(100, 190, seed=2), random_image(64, 64, seed=3)]
    batch = _inputs(processor, images)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert max(lengths) > window and min(lengths) < max(lengths), lengths  # past the window, left-padded rows
    with torch.no_grad():
        plain = model(**batch).logits
    real = batch["attention_mask"].bool()
    with apply_method(model, processor, "fastv", ratio=1.0, layer=1), torch.no_grad():
        batch = _inputs(processor, images)  # with the tile grids the patched processor adds
        torch.testing.assert_close(model(**batch).logits[real], plain[real], atol=1e-5, rtol=1e-5)
    with apply_method(model, processor, "fastv", ratio=0.5, layer=1) as gc, torch.no_grad():
        gen = model.generate(**_inputs(processor, images), max_new_tokens=4, do_sample=False)[:, -4:]
        for i, image in enumerate(images):
            alone = _inputs(processor, [image])
            assert torch.equal(
                model.generate(**alone, max_new_tokens=4, do_sample=False)[:, -4:], gen[i : i + 1]
            )
        alone = _inputs(processor, images[:1])
        model(**alone)
        ours = gc.adapter.pruner.last_scores[0]
    eager = load_tiny_family(tiny_dir, attn_implementation="eager")[0]
    with torch.no_grad():
        maps = eager(**alone, output_attentions=True).attentions[0][0].mean(0)  # layer K - 1 = 0, (S, S)
    assert int((maps[-1] > 0).sum()) == window  # the last token sees its window only
    torch.testing.assert_close(ours, maps[-1], atol=1e-6, rtol=1e-5)


def test_llm_side_scores_on_a_cohere2_full_attention_layer_use_no_positions(tiny_dir):
    """Cohere2 rotates q and k only in its sliding-window layers; its full-attention layers use no positions (Aya
    Vision 8B: every fourth layer, e.g. SparseVLM's third pruning layer). With the tiny LLM's second layer made a
    full-attention layer, PDrop's scores (that layer's attention of the last token) are the eager model's."""
    from transformers import AutoConfig

    from globalcom2.loading import load_tiny_family
    from globalcom2.methods import apply_method

    def load(**kwargs):
        config = AutoConfig.from_pretrained(tiny_dir)
        config.text_config.layer_types = ["sliding_attention", "full_attention"]
        return load_tiny_family(tiny_dir, config=config, **kwargs)

    model, processor = load()
    with apply_method(model, processor, "pdrop", ratio=0.75, stages=2) as gc, torch.no_grad():
        assert gc.adapter.schedule.boundaries == (1,)  # PDrop scores in its stage's first layer: the full one
        inputs = _inputs(processor, [random_image(100, 190, seed=1)])
        model(**inputs)
        ours = gc.adapter.pruner.last_scores[0]
    eager = load(attn_implementation="eager")[0]
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions[1][0].mean(0)  # (S, S)
    torch.testing.assert_close(ours, maps[-1], atol=1e-6, rtol=1e-5)
