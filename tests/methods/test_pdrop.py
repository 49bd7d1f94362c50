"""PyramidDrop inside a real (tiny, random) LLaVA-NeXT LLM, against a plain layer-by-layer re-implementation."""

from __future__ import annotations

import pytest
import torch

from globalcom2.methods import apply_method
from globalcom2.methods.schedule import pdrop_schedule, schedule
from tests.conftest import batch_inputs
from tests.methods.conftest import assert_llm_batch_equals_alone
from tests.methods.plain_llm import head_mean_rows, staged_forward, top_by_score


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A tiny LLaVA-NeXT with an 8-layer LLM (room for PDrop's 4 stages)."""
    from globalcom2.demo.tiny_model import build_tiny_llava_next, load_tiny

    return load_tiny(build_tiny_llava_next(tmp_path_factory.mktemp("tiny8"), text_layers=8, seed=2))


def _plain_pdrop(model, inputs, sched, fixed=None):
    """PDrop's published rule: at each drop layer K_s, that layer's last-token attention (head by head) ranks
    the image tokens still present; the top int(n * share_s) of the n unpruned ones stay; positions renumbered."""
    lm = model.model.language_model
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    counts = [int(n * share) for share in sched.shares]
    scores_seen = []

    def select(stage, seq, positions):
        last = len(seq.origin) - 1
        row = head_mean_rows(lm, seq.extra["score_layer"], seq.h, positions, [last])[0]
        scores_seen.append(row)
        images = [i for i, is_img in enumerate(seq.image) if is_img]
        kept_img = top_by_score(row.tolist(), images, counts[stage])
        return sorted(kept_img + [i for i, is_img in enumerate(seq.image) if not is_img]), None, -1

    logits, kept, decisions = staged_forward(model, inputs, list(sched.boundaries), 0, select, fixed=fixed)
    return logits, kept, decisions, scores_seen, counts


def test_schedule_is_the_papers_and_averages_r():
    paper = pdrop_schedule(32, 0.46875)
    assert paper.boundaries == (8, 16, 24)
    assert paper.shares == pytest.approx((0.5, 0.25, 0.125), abs=1e-12)
    for layers in (32, 12, 8):
        for ratio in (0.5, 0.3):
            sched = schedule("pdrop", layers, ratio)
            assert sched.average == pytest.approx(ratio, abs=1e-12)
            assert len(sched.boundaries) == 3 and list(sched.shares) == sorted(sched.shares, reverse=True)
            n = 2880
            assert n * ratio - 1 < sum(sched.layer_counts(n)) / layers <= n * ratio
    assert pdrop_schedule(32, 0.1).boundaries == (1, 12, 22)  # the first drop reaches layer 1, lambda falls
    assert pdrop_schedule(32, 0.1).shares[0] < 0.5
    with pytest.raises(ValueError, match="out of reach for pdrop on a 8-layer LLM"):
        pdrop_schedule(8, 0.1)
    with pytest.raises(ValueError, match="`stages` must be an int >= 2"):
        pdrop_schedule(32, 0.5, stages=1)
    with pytest.raises(ValueError, match=r"`lam` must be in \(0, 1\)"):
        pdrop_schedule(32, 0.5, lam=1.5)
    with pytest.raises(ValueError, match="gives 3 stages but `stages`=4"):
        pdrop_schedule(32, 0.5, layers=[8, 16])
    with pytest.raises(ValueError, match=r"increasing layers in \[1, 31\]"):
        pdrop_schedule(32, 0.5, layers=[8, 40, 50])
    with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\]"):
        pdrop_schedule(32, 1.5)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_matches_plain_reimplementation(tiny8, ratio):
    """Scores, kept sets per stage, per-layer counts and logits equal the plain rule's; layers stay on SDPA."""
    model, processor = tiny8
    inputs = batch_inputs(processor, [(120, 200)], seeds=[7])
    seen = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True
        )
        for layer in model.model.language_model.layers
    ]
    try:
        with apply_method(model, processor, "pdrop", ratio=ratio) as gc, torch.no_grad():
            ours = model(**inputs).logits
            sched = gc.adapter.schedule
            stage_scores = list(gc.adapter.pruner.state.stage_scores)
            plan = gc.plans[0]
            assert model.config.text_config._attn_implementation == "sdpa"
    finally:
        for h in hooks:
            h.remove()
    plain, kept, _, plain_scores, counts = _plain_pdrop(model, inputs, sched)
    s = inputs["input_ids"].shape[1]
    n = plan.num_tokens_full
    # per-layer counts: the documented schedule, layer by layer
    assert list(plan.layer_tokens) == sched.layer_counts(n)
    assert seen == [s - n + c for c in sched.layer_counts(n)]
    assert gc.method_options["ratio"] == ratio and sched.average == pytest.approx(ratio)
    # scores head by head, at each stage, on the stage's (compacted) sequence
    for ours_s, plain_s in zip(stage_scores, plain_scores, strict=True):
        torch.testing.assert_close(ours_s[0, : plain_s.numel()], plain_s, atol=1e-6, rtol=1e-5)
    # the last stage's kept image tokens are the plan's
    image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().reshape(-1)
    final = set(kept[-1]) & set(image_pos.tolist())
    assert plan.num_tokens == len(final) == counts[-1]
    torch.testing.assert_close(ours, plain, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], plain[:, -1], atol=1e-4)


def test_generate_follows_the_pruned_caches(tiny8):
    """Each decode step equals the plain run on prompt + generated tokens with the prompt's drops replayed."""
    model, processor = tiny8
    inputs = batch_inputs(processor, [(120, 200)], seeds=[3])
    with apply_method(model, processor, "pdrop", ratio=0.4) as gc, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
        sched = gc.adapter.schedule
    _, _, decisions, _, _ = _plain_pdrop(model, inputs, sched)
    s = inputs["input_ids"].shape[1]
    for t, step in enumerate(gen.scores):
        ids = gen.sequences[:, : s + t]
        step_inputs = {**inputs, "input_ids": ids}
        # replay: generated tokens follow every stage's kept entries
        fixed = []
        for k, (keep, extras, after) in enumerate(decisions):
            width = s if k == 0 else len(decisions[k - 1][0])  # the stage's prompt-only length
            fixed.append((keep + list(range(width, width + t)), extras, after))
        plain = staged_forward(model, step_inputs, list(sched.boundaries), 0, None, fixed=fixed)[0][:, -1]
        torch.testing.assert_close(step, plain, atol=2e-5, rtol=1e-4, msg=f"step {t}")


def test_batch_equals_alone_and_remove(tiny8):
    model, processor = tiny8
    layers = assert_llm_batch_equals_alone(
        model, processor, "pdrop", [(100, 180), (200, 64)], lambda p: p.layer_tokens, ratio=0.5
    )
    assert layers[0] != layers[1]


def test_bad_options(tiny8):
    model, processor = tiny8
    with pytest.raises(ValueError, match="out of reach for pdrop"):
        apply_method(model, processor, "pdrop", ratio=0.1)
    with pytest.raises(ValueError, match="`lam` must be"):
        apply_method(model, processor, "pdrop", ratio=0.5, lam=0)
    with pytest.raises(TypeError, match="`layers` must be a sequence"):
        apply_method(model, processor, "pdrop", ratio=0.5, layers="2,4,6")
    with pytest.raises(TypeError, match="unknown option"):
        apply_method(model, processor, "pdrop", ratio=0.5, layer=2)
    assert getattr(model, "_globalcom2_handle", None) is None
    with apply_method(model, None, "pdrop", ratio=0.5, layers=[1, 3, 5]) as gc:
        assert gc.adapter.schedule.boundaries == (1, 3, 5)
        assert gc.method_options["layers"] == [1, 3, 5]
