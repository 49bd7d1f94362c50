"""Every method on every family of the shared table (tests/adapters/families.py), through ``apply_method``.

Per (family, method) pair where the registry says the method runs: ``remove()`` is bit-exact, a batch of mixed sizes
equals each sample alone, several threads on one patched model get what they get alone, and among equal scores the
earlier token wins. The README's test command runs one vision-side and one LLM-side method per family (the checks
are the same code for every method); ``--full`` runs every pair. The registry's support matrix is held to what
``apply_method`` accepts on every family, and the methods whose rule changes with the family are checked against
plain re-implementations: FasterVLM's Eq. 7 scores on towers without [CLS], and FastV / PDrop on families whose
image spans hold marker tokens (InternVL's ``<img>``, Idefics3's ``<row_r_col_c>``), which are never pruned.

The family table's LLMs have 2 layers (Qwen3.5's 3: full attention, linear, full): FastV prunes at layer 1, PDrop runs 2 stages, SparseVLM prunes after layer 0,
and the layer-average methods run at R = 0.75 (the first layer alone sees every token, so R must exceed 1/2).
"""

from __future__ import annotations

import pytest
import torch

from globalcom2.methods import METHODS, apply_method, method_support
from globalcom2.methods.layout import plan_from_keep
from tests.adapters.families import (
    FAMILIES,
    family_fixtures,
    greedy,
    inputs_for,
    make_scores_tie,
    plan_key,
    run_in_threads,
)
from tests.conftest import module_state, sweep
from tests.methods.plain_llm import text_model

#: by default: tiles with markers (InternVL), Idefics3's runs and Eq. 7 (SmolVLM), M-RoPE and regions (Qwen2.5-VL);
#: OneVision, Gemma 3 and the rest with --full; LLaVA-NeXT's methods are tested in tests/methods
family_dir, fam = family_fixtures(FAMILIES, default=["internvl", "smolvlm", "qwen2_5_vl"])

#: options and R of each method on the table's 2-layer LLMs (module docstring)
SETTINGS: dict[str, tuple[float, dict]] = {
    "fastv": (0.5, {"layer": 1}),
    "globalcom2+fastv": (0.5, {"layer": 1}),
    "pdrop": (0.75, {"stages": 2}),
    "sparsevlm": (0.75, {"layers": (0,)}),
    "globalcom2+sparsevlm": (0.75, {"layers": (0,)}),
}
BASELINES = [m for m in METHODS if m != "globalcom2"]  # globalcom2 itself: tests/adapters/test_families.py
DEFAULT = ["fastervlm", "fastv"]  # one vision-side and one LLM-side method per family by default


def _apply(model, processor, method: str, **extra):
    ratio, options = SETTINGS.get(method, (0.25, {}))
    return apply_method(model, processor, method, ratio=ratio, **{**options, **extra})


def _layout_known(handle) -> bool:
    return getattr(handle.adapter, "records_layouts", True)


def _record(handle) -> object:
    """What this thread's last forward kept: its plan, or (positions only) which prompt positions survived."""
    if handle.plans:
        return plan_key(handle.plans[0])
    survivors = handle.adapter.pruner.state.survivors
    return None if survivors is None else survivors.tolist()


def _runs(family, method: str) -> None:
    reason = method_support(method, family.name)
    if reason is not None:
        pytest.skip(reason)


def test_apply_method_accepts_exactly_the_registry_pairs(fam):
    """The support matrix (and the README table generated from it) is what ``apply_method`` accepts: every listed
    pair installs and removes cleanly, every other is a TypeError before anything is patched."""
    family, model, processor = fam
    state = module_state(model)
    for method in METHODS:
        ratio, options = SETTINGS.get(method, (0.25, {}))
        if method_support(method, family.name) is None:
            apply_method(model, processor, method, ratio=ratio, **options).remove()
        else:
            with pytest.raises(TypeError, match=f"is not implemented for {family.name}"):
                apply_method(model, processor, method, ratio=ratio, **options)
        assert module_state(model) == state, method
        assert "_globalcom2_handle" not in model.__dict__ and "_globalcom2_handle" not in processor.__dict__


@pytest.mark.parametrize("method", sweep(BASELINES, [*DEFAULT, "pooling", "prumerge"]))
def test_remove_is_bit_exact_and_a_batch_equals_each_alone(fam, method):
    family, model, processor = fam
    _runs(family, method)
    images = family.images(seed=3)
    with torch.no_grad():
        before = model(**inputs_for(family, processor, images[:2])).logits
    state = module_state(model)
    with _apply(model, processor, method) as handle:
        batch = greedy(model, inputs_for(family, processor, images))
        batch_plans = [plan_key(p) for p in handle.plans]
        # a family whose token layout is not known (positions only) records no per-image plans
        assert len(batch_plans) == (len(images) if _layout_known(handle) else 0)
        for i, image in enumerate(images):
            alone = greedy(model, inputs_for(family, processor, [image]))
            assert torch.equal(batch[i], alone[0]), i
            if batch_plans:
                assert plan_key(handle.plans[0]) == batch_plans[i], i
    assert module_state(model) == state
    with torch.no_grad():
        assert torch.equal(model(**inputs_for(family, processor, images[:2])).logits, before)


@pytest.mark.parametrize("method", sweep(BASELINES, ["fastv"]))
def test_threads_on_one_patched_model_get_what_they_get_alone(fam, method):
    """3 threads x 2 calls with different image sizes at once == the same calls one at a time."""
    family, model, processor = fam
    _runs(family, method)
    jobs = [[family.images(seed=10 * t + c)[(t + c) % len(family.sizes)] for c in range(2)] for t in range(3)]
    with _apply(model, processor, method) as handle:
        expected = {}
        for t, images in enumerate(jobs):
            for c, image in enumerate(images):
                expected[t, c] = (greedy(model, inputs_for(family, processor, [image])), _record(handle))
        got, errors = run_in_threads(
            jobs, lambda image: (greedy(model, inputs_for(family, processor, [image])), _record(handle))
        )
    assert not errors, errors
    assert set(got) == set(expected)
    for key, (out, plan) in expected.items():
        assert torch.equal(got[key][0], out) and got[key][1] == plan, key


def _tie_llm(model) -> None:
    """Every LLM attention logit exactly 0 (zero key projections): every image token gets the same score.

    A sliding-window LLM (Aya Vision's Cohere2, 64 entries here) has its window widened past these prompts (this
    instance's config and layers): the scoring rows see only the layer's window, so tokens outside it would score
    0 and only those inside would tie."""
    lm = text_model(model)
    with torch.no_grad():
        for layer in lm.layers:
            if not hasattr(layer, "self_attn"):  # a linear-attention layer (Qwen3.5) scores nothing
                continue
            for param in layer.self_attn.k_proj.parameters():
                param.zero_()
    if getattr(lm.config, "sliding_window", None) is not None:
        lm.config.sliding_window = 4096
        for layer in lm.layers:
            if getattr(layer.self_attn, "sliding_window", None) is not None:
                layer.self_attn.sliding_window = 4096


def _first_per_region(layout, counts: dict[int, int]) -> torch.Tensor:
    """Keep mask over an image's run: the first ``counts[r]`` tokens of every region r in run order; tokens of a
    region without a count (newlines) are kept."""
    keep = torch.zeros(layout.num_tokens, dtype=torch.bool)
    for region in layout.region.unique().tolist():
        where = (layout.region == region).nonzero().reshape(-1)
        keep[where[: counts.get(region, where.numel())]] = True
    return keep


LLM_TIES = ["fastv", "pdrop", "sparsevlm", "globalcom2+fastv", "globalcom2+sparsevlm"]


@pytest.mark.parametrize("method", sweep(LLM_TIES, ["fastv", "globalcom2+fastv"]))
def test_llm_side_tie_rule_keeps_the_earliest_image_tokens(fam, method):
    """All LLM scores exactly equal: each stage keeps the earliest image tokens (per sample; per region for the
    combinations); markers are not image tokens and stay. SparseVLM without recycling (recycled tokens are new)."""
    family, model, processor = fam
    _runs(family, method)
    _tie_llm(model)
    image = family.images()[0]
    extra = {"recycle": 0.0} if "sparsevlm" in method else {}
    with _apply(model, processor, method, **extra) as handle:
        inputs = inputs_for(family, processor, [image])
        greedy(model, inputs, new_tokens=1)
        adapter = handle.adapter
        share = adapter.schedule.shares[-1]
        if not _layout_known(handle):  # positions only: the earliest image tokens of the prompt reach the end
            image = inputs["input_ids"][0] == model.config.image_token_id
            n = int(image.sum())
            survivors = adapter.pruner.state.survivors[0]
            assert handle.plans == [] and bool(survivors[~image].all())  # markers and text all stay
            kept = survivors[image].nonzero().reshape(-1).tolist()
            assert kept == list(range(int(n * share))), kept
            return
        plan = handle.plans[0]
        layout = adapter.pruner.state.layouts[0]
        vision = adapter.pruner.state.vision_plans
    if vision is None:
        keep = torch.arange(layout.num_tokens) < int(layout.num_tokens * share)
    else:
        if method == "globalcom2+sparsevlm":
            counts = adapter.stage_region_counts(share, vision).tolist()
        else:
            counts = [int(vision[0].thumbnail_mask.sum()), *vision[0].crop_keep_counts.tolist()]
        keep = _first_per_region(layout, dict(enumerate(counts)))
    expected = plan_from_keep(layout, keep)
    assert plan.num_tokens == int(keep.sum()) > 0
    assert torch.equal(plan.thumbnail_mask, expected.thumbnail_mask)
    assert torch.equal(plan.crops_mask, expected.crops_mask)


@pytest.mark.parametrize("method", sweep(["fastervlm", "random"], ["fastervlm"]))
def test_vision_baselines_keep_the_budget_counts_of_globalcom2(fam, method):
    """FasterVLM and random keep GlobalCom²'s budget-mode count at uniform R on every family (same token count,
    other tokens), and the processor emits it."""
    family, model, processor = fam
    _runs(family, method)
    image = family.images()[1]
    import globalcom2

    with globalcom2.apply(model, processor, ratio=0.25, allocation="uniform") as gc:
        greedy(model, inputs_for(family, processor, [image]), new_tokens=1)
        ours = gc.plans[0]
    with apply_method(model, processor, method, ratio=0.25) as handle:
        greedy(model, inputs_for(family, processor, [image]), new_tokens=1)
        theirs = handle.plans[0]
    assert theirs.num_tokens == ours.num_tokens < ours.num_tokens_full
    assert torch.equal(theirs.crop_keep_counts, ours.crop_keep_counts)


@pytest.mark.parametrize("method", sweep(["prumerge", "prumerge+"], ["prumerge"]))
def test_prumerge_tie_rule_keeps_the_earliest_tokens(fam, method):
    """Every [CLS] score of every tile exactly equal (zero last-layer keys): no tile has an IQR outlier, so each keeps
    its first token (the fallback, marked in ``fallback_tiles``), plus PruMerge+'s samples 0, s, 2s, ... < N - 1 with
    s = N // 3; among equal scores the earlier token wins everywhere."""
    family, model, processor = fam
    _runs(family, method)
    make_scores_tie(model)
    with apply_method(model, processor, method) as handle:
        greedy(model, inputs_for(family, processor, [family.images()[0]]), new_tokens=1)
        plan = handle.plans[0]
    g = plan.thumbnail_mask.shape[0]
    rows, cols = plan.grid
    top, bottom, left, right = plan.valid_box  # LLaVA-NeXT: a crop's tokens are its unpadded ones
    inside = torch.zeros(rows * g, cols * g, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    tiles = [(plan.thumbnail_mask.reshape(-1), list(range(g * g)))]
    for r in range(rows):
        for c in range(cols):
            block = (slice(r * g, (r + 1) * g), slice(c * g, (c + 1) * g))
            tiles.append(
                (plan.crops_mask[block].reshape(-1), inside[block].reshape(-1).nonzero().reshape(-1).tolist())
            )
    for kept, valid in tiles:
        step = max(1, len(valid) // 3)
        expected = {valid[0]} | (
            {valid[p] for p in range(0, len(valid) - 1, step)} if "+" in method else set()
        )
        assert set(kept.nonzero().reshape(-1).tolist()) == expected
    assert plan.fallback_tiles.all() and plan.outlier_counts.tolist() == [1] * len(tiles)
