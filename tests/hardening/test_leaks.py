"""No state leaks: stray tower calls and interrupted forwards leave no scores behind, and remove() leaves nothing of
GlobalCom² reachable from the model or the processor.

(Memory over many generate calls and two patched models at once are covered for every family by
tests/adapters/test_families.py.)"""

from __future__ import annotations

import functools
import gc
import inspect
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


def _images(k: int, n: int = 2) -> list:
    rng = np.random.default_rng(k)
    return [
        random_image(int(rng.integers(20, 400)), int(rng.integers(20, 400)), seed=k * 10 + i)
        for i in range(n)
    ]


def test_stray_tower_calls_and_interrupted_forwards_leave_no_stale_scores(tiny):
    """Tower runs outside the patched get_image_features (direct calls) record nothing, and an encode interrupted
    by an exception leaves no scores behind: the next forward plans from its own scores only."""
    model, processor = tiny
    images = _images(1)
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        inputs = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**inputs)
            clean = [(p.thumbnail_mask.clone(), p.crops_mask.clone()) for p in handle.plans]
            assert handle.state.scores == [] and handle.state.capturing == 0  # consumed by the pack
            stray = processor(images=_images(2, n=1), text=[PROMPT], return_tensors="pt")["pixel_values"][0]
            for _ in range(5):
                model.model.vision_tower(stray, output_hidden_states=True)
            assert handle.state.scores == []  # nothing recorded outside the capture scope
            hook = model.model.multi_modal_projector.register_forward_hook(
                lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
            )
            with pytest.raises(KeyboardInterrupt):
                model(**inputs)
            hook.remove()
            # The capture scope closed on the way out: no scores, no open scope.
            assert handle.state.scores == [] and handle.state.capturing == 0
            model(**inputs)
        assert handle.state.scores == [] and handle.state.capturing == 0
        for (t, c), p in zip(clean, handle.plans, strict=True):
            assert torch.equal(t, p.thumbnail_mask) and torch.equal(c, p.crops_mask)


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
