"""Shared fixtures: tiny random LLaVA-NeXT checkpoints written to disk and loaded back offline."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Two tiers. The README's `python -m pytest -q` runs every behaviour on every family, but the expensive sweeps
# (e.g. every method x every family) on a representative subset; `.ci/run` adds `python -m pytest -q --full -m full`,
# which runs exactly the cases the default run left out. Mark such cases with `sweep(...)` or `pytest.mark.full`.


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the full sweeps (cases marked `full`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of a full sweep; runs only with --full (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full sweep: run with --full (as .ci/run does)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


def sweep(values, default, ids=None):
    """``values`` as pytest params, the ones not in ``default`` marked ``full`` (run only with ``--full``).

    ``default`` holds the values (or, for objects with a ``name``, their names) that the README's test command runs.
    """
    keep = set(default)
    params = []
    for k, value in enumerate(values):
        key = getattr(value, "name", value)
        marks = () if key in keep else (pytest.mark.full,)
        params.append(pytest.param(value, marks=marks, id=None if ids is None else ids[k]))
    return params


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(builder, **kwargs) -> path``: each tiny checkpoint is built once per test session and shared by
    every module that asks for the same builder and arguments (tests only read it, through ``from_pretrained``)."""
    built: dict[tuple, object] = {}

    def build(builder, **kwargs):
        key = (builder.__module__, builder.__qualname__, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = builder(tmp_path_factory.mktemp(builder.__name__), **kwargs)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_clip_dir(checkpoint):
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    return checkpoint(build_tiny_llava_next)


@pytest.fixture()
def tiny(tiny_clip_dir):
    """A fresh (model, processor) pair loaded with from_pretrained from the tiny checkpoint."""
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny_clip_dir)


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth random blobs rather than white noise, so scores have spatial structure.
    small = rng.integers(0, 255, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def batch_inputs(processor, sizes, seeds=None):
    """A padded batch of ``PROMPT`` with one smooth random image per ``(height, width)`` (seed = its index)."""
    images = [random_image(*s, seed=k if seeds is None else seeds[k]) for k, s in enumerate(sizes)]
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def module_state(model) -> list:
    """Instance attributes and hooks of every module (what a patch could leave behind)."""
    hooks = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
    )
    return [(name, sorted(vars(m)), [len(getattr(m, h)) for h in hooks]) for name, m in model.named_modules()]


def assert_sweep_plans_match(model, processor, name, image, methods, ratio=0.1):
    """``globalcom2 eval``'s shortcut (one tower pass, then each method's planner) gives the adapters' own plans."""
    import torch

    from globalcom2.evaluation.runner import photo_data, vision_plans
    from globalcom2.methods import apply_method

    plans = vision_plans(photo_data(model, processor, name, image), ratio, random_draws=1, seed=0)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    for method in methods:
        with apply_method(model, processor, method, ratio=ratio) as gc, torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            ours, theirs = plans[method][0], gc.plans[0]
        assert torch.equal(ours.crops_mask, theirs.crops_mask), method
        assert torch.equal(ours.thumbnail_mask, theirs.thumbnail_mask), method
        assert ours.num_tokens == theirs.num_tokens, method


_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _ours(depth: int = 2) -> str | None:
    frame = sys._getframe(depth)
    name = frame.f_globals.get("__name__", "")
    return f"{name}.{frame.f_code.co_name}" if name.startswith("globalcom2") else None


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[tuple[str, str]]]:
    """Record ``(method, caller)`` of every host read of a tensor made from globalcom2 code inside the block.

    Host reads are counted on the CPU by wrapping every ``Tensor`` method that must read a tensor's values on the
    host (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``nonzero``) and, through a
    torch-function mode, boolean-mask indexing; on a GPU each is a device synchronisation.

    ``Tensor.__getitem__`` itself is never patched: assigning a Python ``__getitem__`` to the class gives it a
    sequence slot that deleting the attribute does not take back, so for the rest of the process
    ``torch.tensor([...])`` would treat 0-d tensors as sequences (and HF Qwen's ``get_rope_index`` would fail).
    """
    calls: list[tuple[str, str]] = []
    with pytest.MonkeyPatch.context() as monkeypatch, _MaskedIndexing(calls):
        _patch_host_reads(monkeypatch, calls)
        yield calls


class _MaskedIndexing(TorchFunctionMode):
    """Records boolean-mask indexing (``x[mask]``, a host read of the mask's count) made from globalcom2 code."""

    def __init__(self, calls: list[tuple[str, str]]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                caller = _ours()  # frames: _ours, this method, the code that indexed
                if caller:
                    self.calls.append(("bool-index", caller))
        return func(*args, **(kwargs or {}))


def _patch_host_reads(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str]]) -> None:
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = _ours()
            if caller:
                calls.append((_name, caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    nonzero = torch.nonzero

    def nonzero_fn(*args, **kwargs):
        caller = _ours()
        if caller:
            calls.append(("torch.nonzero", caller))
        return nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero_fn)
