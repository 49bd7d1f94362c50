"""No state leaks: memory stays flat over many generate calls, two patched models do not interfere, and remove()
leaves nothing of GlobalCom² reachable from the model or the processor."""

from __future__ import annotations

import functools
import gc
import inspect
import os
import weakref

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.adapters.base import GlobalComHandle
from tests.conftest import PROMPT, random_image

HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter)


def _images(k: int, n: int = 2) -> list:
    rng = np.random.default_rng(k)
    return [
        random_image(int(rng.integers(20, 400)), int(rng.integers(20, 400)), seed=k * 10 + i)
        for i in range(n)
    ]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS from /proc (Linux)")
@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_repeated_generate_does_not_grow_memory(tiny, mode):
    model, processor = tiny
    handle = globalcom2.apply(model, processor, ratio=0.25, mode=mode)

    def step(k: int) -> None:
        images = _images(k)
        inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle._pending_scores == []  # consumed by the pack of this very call
        assert len(handle.plans) == len(images)  # the last forward only

    for k in range(3):  # warm-up: allocator pools, HF caches, lazy imports
        step(k)
    tensors, rss = live_tensors(), rss_bytes()
    for k in range(3, 23):
        step(k)
    grown_tensors, grown_rss = live_tensors() - tensors, rss_bytes() - rss
    handle.remove()
    print(
        f"{mode}: 20 more generate calls: {grown_tensors:+d} live tensors, {grown_rss / 2**20:+.1f} MiB RSS"
    )
    assert grown_tensors <= 8  # (noise: a few cached tensors of HF/torch)
    assert (
        grown_rss < 48 * 2**20
    )  # generous noise bound; a leak is caught by the tensor count and buffers above


def test_stray_tower_calls_and_interrupted_forwards_leave_no_stale_scores(tiny):
    """Scores of a tower run that is never packed (a direct call, an exception) are replaced, not queued."""
    model, processor = tiny
    images = _images(1)
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        inputs = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**inputs)
            clean = [(p.thumbnail_mask.clone(), p.crops_mask.clone()) for p in handle.plans]
            stray = processor(images=_images(2, n=1), text=[PROMPT], return_tensors="pt")["pixel_values"][0]
            for _ in range(5):
                model.model.vision_tower(stray, output_hidden_states=True)
            assert len(handle._pending_scores) == 1  # bounded, whatever the number of stray calls
            hook = model.model.multi_modal_projector.register_forward_hook(
                lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
            )
            with pytest.raises(KeyboardInterrupt):
                model(**inputs)
            hook.remove()
            model(**inputs)
        assert handle._pending_scores == []
        for (t, c), p in zip(clean, handle.plans, strict=True):
            assert torch.equal(t, p.thumbnail_mask) and torch.equal(c, p.crops_mask)


def test_two_patched_models_do_not_interfere(tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    model_a, proc_a = load_tiny(tiny_clip_dir)
    model_b, proc_b = load_tiny(tiny_clip_dir)
    imgs_a, imgs_b = _images(3), _images(4)

    def run(model, processor, images):
        inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            logits = model(**inputs).logits
        return out, logits

    # Each model alone first.
    with globalcom2.apply(model_a, proc_a, ratio=0.5) as h:
        alone_a, alone_a_plans = run(model_a, proc_a, imgs_a), h.plans
    with globalcom2.apply(model_b, proc_b, ratio=0.1, mode="reference") as h:
        alone_b, alone_b_plans = run(model_b, proc_b, imgs_b), h.plans
    # Both patched at once, calls interleaved.
    ha = globalcom2.apply(model_a, proc_a, ratio=0.5)
    hb = globalcom2.apply(model_b, proc_b, ratio=0.1, mode="reference")
    for _ in range(2):
        ra = run(model_a, proc_a, imgs_a)
        plans_a = ha.plans
        rb = run(model_b, proc_b, imgs_b)
        assert ha.plans is plans_a  # B's forward did not touch A's handle
        for (x, y), (u, v) in ((ra, alone_a), (rb, alone_b)):
            assert torch.equal(x, u) and torch.equal(y, v)
    for plans, alone in ((ha.plans, alone_a_plans), (hb.plans, alone_b_plans)):
        for p, q in zip(plans, alone, strict=True):
            assert torch.equal(p.crops_mask, q.crops_mask) and p.num_tokens == q.num_tokens
    ha.remove()  # removing A leaves B compressing exactly as before
    assert torch.equal(run(model_b, proc_b, imgs_b)[0], alone_b[0])
    hb.remove()


def _snapshot(model, processor):
    hooks = {
        (name, d): list(getattr(m, d, {}).keys()) for name, m in model.named_modules() for d in HOOK_DICTS
    }  # fmt: skip
    globals_ = {k: list(v.keys()) for k, v in vars(torch.nn.modules.module).items()
                if k.startswith("_global_") and isinstance(v, dict)}  # fmt: skip
    classes = {}
    for obj in (model, model.model, processor, processor.image_processor, processor.tokenizer,
                *model.modules()):  # fmt: skip
        for cls in type(obj).__mro__:
            classes.setdefault(cls, dict(vars(cls)))
    return hooks, globals_, classes


def _refers_to_globalcom2(value, depth: int = 0) -> bool:
    if isinstance(value, GlobalComHandle):
        return True
    if isinstance(value, functools.partial):
        return (
            True
            if _refers_to_globalcom2(value.func, depth + 1)
            else any(_refers_to_globalcom2(a, depth + 1) for a in (*value.args, *value.keywords.values()))
        )
    if inspect.ismethod(value):
        return _refers_to_globalcom2(value.__func__, depth + 1) or _refers_to_globalcom2(
            value.__self__, depth + 1
        )
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        return (getattr(value, "__module__", "") or "").startswith("globalcom2")
    if type(value).__module__.startswith("globalcom2"):
        return True
    if depth < 2 and isinstance(value, (dict, list, tuple, set)) and not isinstance(value, torch.Tensor):
        items = value.values() if isinstance(value, dict) else value
        return any(_refers_to_globalcom2(v, depth + 1) for v in items)
    return False


@pytest.mark.parametrize(
    "options",
    [{"mode": "budget"}, {"mode": "reference"}, {"mode": "budget", "importance": "cosine"}],
    ids=["budget", "reference", "cosine"],
)
def test_remove_leaves_nothing_behind(tiny, options):
    model, processor = tiny
    inputs = processor(images=_images(5), text=[PROMPT] * 2, return_tensors="pt", padding=True)
    model.generate(
        **inputs, max_new_tokens=2, do_sample=False
    )  # HF installs its output-capturing hooks lazily
    before = _snapshot(model, processor)
    handle = globalcom2.apply(model, processor, ratio=0.25, **options)
    inputs = processor(images=_images(5), text=[PROMPT] * 2, return_tensors="pt", padding=True)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.plans
    handle.remove()
    after = _snapshot(model, processor)
    assert after[0] == before[0], "hooks left on modules"
    assert after[1] == before[1], "global module hooks changed"
    for cls, attrs in before[2].items():
        assert dict(vars(cls)) == attrs, f"class {cls.__name__} was modified"
    owners = [*model.modules(), processor, processor.image_processor, processor.tokenizer]
    for obj in owners:
        for name, value in vars(obj).items():
            assert not _refers_to_globalcom2(value), f"{type(obj).__name__}.{name} still refers to GlobalCom²"
    # Nothing in the model's or processor's object graph holds the handle (or its adapter) any more.
    gc.collect()
    owner_dicts = {id(vars(o)) for o in owners}
    for ref in gc.get_referrers(handle):
        assert id(ref) not in owner_dicts and not isinstance(ref, (functools.partial, type(model.forward))), (
            ref
        )
    handle_ref, adapter_ref = weakref.ref(handle), weakref.ref(handle.adapter)
    del handle
    gc.collect()
    assert handle_ref() is None and adapter_ref() is None  # the model kept no reference: both are freed
    model.generate(**processor(images=_images(5), text=[PROMPT] * 2, return_tensors="pt", padding=True),
                   max_new_tokens=2, do_sample=False)  # fmt: skip
