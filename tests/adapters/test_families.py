"""Family-generic behaviour, one table of tiny models (tests/adapters/families.py), every family and mode.

apply -> remove is bit-exact; a batch equals each sample alone; several threads on one patched model get what they
get one at a time; memory does not grow; two patched models in one process do not interfere; and among equal
scores the token earlier in raster order is kept (the tie rule).
"""

from __future__ import annotations

import gc

import pytest
import torch

import globalcom2
from tests.adapters.families import (
    FAMILIES,
    family_fixtures,
    greedy,
    inputs_for,
    load,
    make_scores_tie,
    plan_key,
    run_in_threads,
)
from tests.conftest import count_host_reads, module_state

MODES = ("budget", "reference")


family_dir, fam = family_fixtures(FAMILIES)


def test_apply_remove_is_bit_exact_and_leaves_nothing(fam):
    family, model, processor = fam
    images = family.images()[:2]
    plain_inputs = inputs_for(family, processor, images)
    with torch.no_grad():
        before = model(**plain_inputs).logits
    state, proc_attrs = module_state(model), sorted(vars(processor))
    for mode in family.modes:
        handle = globalcom2.apply(model, processor, ratio=0.25, mode=mode)
        greedy(model, inputs_for(family, processor, images))
        assert len(handle.plans) == len(images)
        assert type(processor).__name__ in repr(
            processor
        )  # transformers deep-copies a processor for its repr
        handle.remove()
        handle.remove()  # twice is a no-op
        assert module_state(model) == state and sorted(vars(processor)) == proc_attrs
    with torch.no_grad():
        after = model(**inputs_for(family, processor, images)).logits
    assert torch.equal(before, after)


def test_tiny_checkpoint_has_no_zero_weight_matrix(fam):
    """HF initialises some matrices to zero (Gemma 3's projector, InternViT's [CLS]): the tiny checkpoints must not
    keep them so, or the image rows the LLM reads are constant and the tests comparing them compare nothing."""
    _, model, _ = fam
    zero = [name for name, p in model.named_parameters() if p.dim() >= 2 and not bool(p.any())]
    assert not zero, zero


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_mixed_sizes_equals_each_alone(fam, mode):
    family, model, processor = fam
    _skip_undefined(family, mode)
    images = family.images(seed=3)
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as handle:
        batch = greedy(model, inputs_for(family, processor, images))
        batch_plans = [plan_key(p) for p in handle.plans]
        for i, image in enumerate(images):
            alone = greedy(model, inputs_for(family, processor, [image]))
            assert torch.equal(batch[i], alone[0]), i
            assert plan_key(handle.plans[0]) == batch_plans[i], i


@pytest.mark.parametrize("mode", MODES)
def test_one_selection_and_no_more_host_reads_per_forward_whatever_the_batch(fam, mode, monkeypatch):
    """A forward plans all its images with one vectorised selection, and the host reads made from globalcom2's code
    (each a device synchronisation on a GPU) are as many for four images as for one."""
    import globalcom2.core.select as select

    family, model, processor = fam
    _skip_undefined(family, mode)
    images = family.images(seed=5)
    calls: list[int] = []
    original = select.select_batch
    monkeypatch.setattr(
        select, "select_batch", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    )
    reads = []
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode), torch.no_grad():
        for batch in (images[:1], images):
            inputs = inputs_for(family, processor, batch)
            model(**inputs)  # warm-up: host-side layouts are cached per geometry
            calls.clear()
            with count_host_reads() as got:
                model(**inputs)
            reads.append(got)
    assert calls == [len(images)], calls  # the last forward: one selection over all images
    assert len(reads[0]) == len(reads[1]), reads


@pytest.mark.parametrize("mode", MODES)
def test_threads_on_one_patched_model_get_what_they_get_alone(fam, mode):
    """4 threads x 3 generate calls with different image sizes at once == the same calls one at a time."""
    family, model, processor = fam
    _skip_undefined(family, mode)
    sizes = family.sizes
    jobs = [[family.images(seed=10 * t + c)[(t + c) % len(sizes)] for c in range(3)] for t in range(4)]
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as handle:
        expected = {}
        for t, images in enumerate(jobs):
            for c, image in enumerate(images):
                out = greedy(model, inputs_for(family, processor, [image]))
                expected[t, c] = (out, plan_key(handle.plans[0]))
        got, errors = run_in_threads(
            jobs,
            lambda image: (
                greedy(model, inputs_for(family, processor, [image])),
                plan_key(handle.plans[0]),  # this thread's own last forward
            ),
        )
        assert not errors, errors
        assert set(got) == set(expected)
        for key, (out, plan) in expected.items():
            assert torch.equal(got[key][0], out), key
            assert got[key][1] == plan, key


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter)


@pytest.mark.parametrize("mode", MODES)
def test_repeated_generate_keeps_no_tensors(fam, mode):
    family, model, processor = fam
    _skip_undefined(family, mode)
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as handle:
        for k in range(2):  # warm-up: lazy imports, HF caches
            greedy(model, inputs_for(family, processor, family.images(seed=k)[:2]), new_tokens=2)
        before = _live_tensors()
        for k in range(2, 12):
            greedy(model, inputs_for(family, processor, family.images(seed=k)[:2]), new_tokens=2)
        grown = _live_tensors() - before
        assert handle.state.scores == []  # consumed by the encode that recorded them
    assert grown <= 8, f"{grown} more live tensors after 10 generate calls"


def test_two_patched_models_in_one_process_do_not_interfere(family_dir):
    """Two copies of a family, one in budget mode at R = 0.5, one in reference mode at R = 0.1, interleaved: each
    gets what it gets alone, and removing one leaves the other compressing."""
    family, path = family_dir
    (m1, p1), (m2, p2) = load(path), load(path)
    setups = ((m1, p1, dict(ratio=0.5)), (m2, p2, dict(ratio=0.1, mode=family.modes[-1])))
    images = family.images(seed=7)[:2]
    alone = []
    for model, processor, options in setups:
        with globalcom2.apply(model, processor, **options) as handle:
            alone.append(
                (greedy(model, inputs_for(family, processor, images)), [plan_key(p) for p in handle.plans])
            )
    handles = [globalcom2.apply(model, processor, **options) for model, processor, options in setups]
    try:
        for _ in range(2):  # interleaved
            for (model, processor, _), handle, (out, plans) in zip(setups, handles, alone, strict=True):
                assert torch.equal(greedy(model, inputs_for(family, processor, images)), out)
                assert [plan_key(p) for p in handle.plans] == plans
        handles[0].remove()
        assert torch.equal(greedy(m2, inputs_for(family, p2, images)), alone[1][0])
        assert [plan_key(p) for p in handles[1].plans] == alone[1][1]
    finally:
        for handle in handles:
            handle.remove()


def _first_in_raster(mask: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the first ``k`` True cells of ``valid`` in raster order."""
    flat = valid.reshape(-1)
    out = torch.zeros_like(flat)
    out[flat.nonzero().reshape(-1)[:k]] = True
    return out.reshape(mask.shape)


@pytest.mark.parametrize("mode", MODES)
def test_tie_rule_keeps_the_first_tokens_in_raster_order(fam, mode):
    """All token scores exactly equal: the thumbnail keeps its first int(N*R) tokens, and every crop its first
    k_j valid tokens, in raster order (InternVL: the raster of the pixel-shuffled grid)."""
    family, model, processor = fam
    _skip_undefined(family, mode)
    make_scores_tie(model)
    image = family.images()[0].resize((family.tie_size[1], family.tie_size[0]))
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode, scoring="local") as handle:
        greedy(model, inputs_for(family, processor, [image]), new_tokens=1)
        plan = handle.plans[0]
    if family.native:
        _check_native_tie_rule(plan, handle.config)
        return
    g = plan.thumbnail_mask.shape[0]
    k0 = int(g * g * 0.25)
    assert plan.thumbnail_order.tolist() == list(range(k0))
    rows, cols = plan.grid
    assert rows * cols > 1 and plan.token_mask is None  # several crops, not down-sampled
    top, bottom, left, right = plan.valid_box
    for j in range(rows * cols):
        r, c = divmod(j, cols)
        block = (slice(r * g, (r + 1) * g), slice(c * g, (c + 1) * g))
        valid = torch.zeros_like(plan.crops_mask)
        valid[top:bottom, left:right] = True
        kept, valid = plan.crops_mask[block], valid[block]
        k = int(plan.crop_keep_counts[j])
        assert k == int(kept.sum()) and 0 < k < int(valid.sum()), (j, k)
        assert torch.equal(kept, _first_in_raster(kept, valid, k)), j


def _skip_undefined(family, mode: str) -> None:
    if mode not in family.modes:
        pytest.skip(f"mode={mode!r} is not defined for {family.name}")


def _check_native_tie_rule(plan, config) -> None:
    """Native-resolution families: every region keeps its first k_j tokens in its raster order, none of the
    virtual global view reaches the LLM."""
    from globalcom2.adapters.qwen import region_tokens_of
    from globalcom2.core.regions import region_layout

    assert plan.thumbnail_order.numel() == 0 and not plan.thumbnail_mask.any()
    height, width = plan.crops_mask.shape
    layout = region_layout(height, width, region_tokens_of(config))
    assert layout.num_crops > 1 and layout.grid == plan.grid
    kept, valid = layout.to_table(plan.crops_mask, False), layout.valid()
    for j in range(layout.num_crops):
        k = int(plan.crop_keep_counts[j])
        assert k == int(kept[j].sum()) and 0 < k < int(valid[j].sum()), (j, k)
        assert torch.equal(kept[j], _first_in_raster(kept[j], valid[j], k)), j


def test_tie_rule_in_the_fastervlm_baseline(fam):
    """The baselines rank with the same rule on every family: FasterVLM (per-tile top-k by Eq. 1 or Eq. 7) keeps the
    first k tokens of each tile."""
    from globalcom2.methods import apply_method

    family, model, processor = fam
    make_scores_tie(model)
    image = family.images()[0].resize((family.tie_size[1], family.tie_size[0]))
    with apply_method(model, processor, "fastervlm", ratio=0.25) as handle:
        greedy(model, inputs_for(family, processor, [image]), new_tokens=1)
        plan = handle.plans[0]
    if family.native:  # regions of the merged grid (core.regions), no thumbnail tokens
        _check_native_tie_rule(plan, handle.config)
        return
    g = plan.thumbnail_mask.shape[0]
    assert plan.thumbnail_order.tolist() == list(range(int(g * g * 0.25)))
    rows, cols = plan.grid
    top, bottom, left, right = plan.valid_box
    valid = torch.zeros_like(plan.crops_mask)
    valid[top:bottom, left:right] = True
    for j in range(rows * cols):
        r, c = divmod(j, cols)
        block = (slice(r * g, (r + 1) * g), slice(c * g, (c + 1) * g))
        kept = plan.crops_mask[block]
        assert torch.equal(kept, _first_in_raster(kept, valid[block], int(kept.sum()))), j


def test_error_classes(fam):
    """The library's errors are its own classes and the builtins users already catch."""
    family, model, processor = fam
    images = family.images()[:1]
    plain_inputs = inputs_for(family, processor, images)  # made before apply: uncompressed placeholder count
    with pytest.raises(globalcom2.UnsupportedModelError) as err:
        globalcom2.apply(model, processor.tokenizer, ratio=0.25)
    assert isinstance(err.value, TypeError)
    with globalcom2.apply(model, processor, ratio=0.25):
        with pytest.raises(globalcom2.AlreadyAppliedError) as err:
            globalcom2.apply(model, processor, ratio=0.5)
        assert isinstance(err.value, ValueError)
        if family.needs_grids:  # inputs without tile grids pass through uncompressed (documented)
            with pytest.warns(UserWarning, match="no tile grids"), torch.no_grad():
                model(**plain_inputs)
        else:
            with pytest.raises(globalcom2.PlaceholderMismatchError, match="call the processor again") as err:
                with torch.no_grad():
                    model(**plain_inputs)
            assert isinstance(err.value, ValueError)
    with torch.no_grad():
        model(**plain_inputs)  # removed: the plain inputs work again
