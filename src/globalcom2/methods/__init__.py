"""Baselines and combinations behind one API: ``apply_method(model, processor, method=..., ratio=...)``.

Every method is a family adapter installed by the one install path of :func:`globalcom2.apply`
(:func:`globalcom2.adapters.base.install`), so it returns the same :class:`~globalcom2.GlobalComHandle`: ``.plans``
after each forward (one :class:`~globalcom2.Plan` per image), ``.remove()`` and the context-manager form;
``handle.method`` names the method and ``handle.method_options`` holds its options. A baseline is the GlobalCom²
pipeline with one step swapped:

| method | stage | what it keeps | what is swapped |
|---|---|---|---|
| ``globalcom2`` | vision | GlobalCom² itself (:func:`globalcom2.apply`, every option) | nothing |
| ``fastervlm`` | vision | per tile, top tokens by the tile's own [CLS] attention at uniform R | the config |
| ``random`` | vision | the same counts as GlobalCom² budget mode, drawn at random per tile | the scores |
| ``pooling`` | vision | each tile average-pooled to about R of its tokens | count and packing |
| ``fastv`` | LLM | from layer K on, the image tokens the last prompt token attends to most | LLM-side pruning |
| ``globalcom2+fastv`` | vision + LLM | GlobalCom²'s per-crop counts, FastV's choice inside each crop (Fig. 8) | selection in crops |

The baselines are written for LLaVA-NeXT; other families get a TypeError before anything is patched.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..adapters import adapter_for
from ..adapters.base import GlobalComHandle, install
from ..adapters.errors import UnsupportedModelError
from ..adapters.llava_next import LlavaNextAdapter
from ..config import GlobalComConfig

__all__ = ["METHODS", "MethodSpec", "apply_method", "available_methods", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, where it acts, its options (name -> default) and how to build its adapter.

    ``adapter(model, processor, ratio=..., **options)`` returns the adapter that
    :func:`~globalcom2.adapters.base.install` installs; None means :func:`globalcom2.apply` itself.
    """

    name: str
    stage: str  # "vision", "llm" or "vision+llm"
    description: str
    options: dict[str, Any]
    adapter: Callable[..., Any] | None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Register a method; a duplicate name is an error."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


def available_methods() -> list[str]:
    return list(METHODS)


def _llava_next(model: Any, method: str) -> type[LlavaNextAdapter]:
    """The registry's adapter class for ``model``, which must be LLaVA-NeXT's (TypeError before any patch)."""
    family = adapter_for(model)  # unsupported models: the same TypeError as globalcom2.apply
    if not issubclass(family, LlavaNextAdapter):
        raise UnsupportedModelError(
            f"method {method!r} supports {LlavaNextAdapter.model_class_name} only, got {type(model).__name__} "
            "(method='globalcom2' supports every family of globalcom2.apply)"
        )
    return family


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _fastervlm(model: Any, processor: Any, *, ratio: float, **options: Any) -> LlavaNextAdapter:
    from .vision import FASTERVLM

    family = _llava_next(model, "fastervlm")
    return family(
        model, processor, GlobalComConfig.from_kwargs(None, ratio=ratio, **{**FASTERVLM, **options})
    )


def _random(model: Any, processor: Any, *, ratio: float, seed: int = 0) -> LlavaNextAdapter:
    from .vision import RANDOM, RandomAdapter

    _llava_next(model, "random")
    seed = _integer("seed", seed)
    return RandomAdapter(model, processor, GlobalComConfig(ratio=ratio, **RANDOM), seed=seed)


def _pooling(model: Any, processor: Any, *, ratio: float) -> LlavaNextAdapter:
    from .vision import PoolingAdapter

    _llava_next(model, "pooling")
    return PoolingAdapter(model, processor, GlobalComConfig(ratio=ratio))


def _fastv(model: Any, processor: Any, *, ratio: float, layer: int = 2, equivalent: bool = False) -> Any:
    from .fastv import FastVAdapter

    _llava_next(model, "fastv")
    cfg = GlobalComConfig(ratio=ratio)
    return FastVAdapter(model, processor, cfg, layer=_integer("layer", layer), equivalent=bool(equivalent))


def _globalcom2_fastv(model: Any, processor: Any, *, ratio: float, layer: int = 2, **options: Any) -> Any:
    from .fastv import GlobalComFastVAdapter

    _llava_next(model, "globalcom2+fastv")
    cfg = GlobalComConfig.from_kwargs(None, ratio=ratio, mode="budget", **options)
    return GlobalComFastVAdapter(model, processor, cfg, layer=_integer("layer", layer))


_GC_OPTIONS = {"mode": "budget", "allocation": "softmax-sum", "scoring": "holistic", "alpha": 0.5, "tau": 10.0,
               "score": "logits", "importance": "auto"}  # fmt: skip

register_method(MethodSpec("globalcom2", "vision", "GlobalCom² (paper Sec. 4)", dict(_GC_OPTIONS), None))
register_method(MethodSpec(
    "fastervlm", "vision", "per-tile [CLS]-attention top-k at uniform R (FasterVLM-style)",
    {"mode": "budget", "score": "softmax", "importance": "auto"}, _fastervlm,
))  # fmt: skip
register_method(MethodSpec(
    "random", "vision", "random tokens per tile, GlobalCom² budget counts at uniform R", {"seed": 0}, _random
))  # fmt: skip
register_method(MethodSpec("pooling", "vision", "average pooling of every tile to about R of its tokens", {},
                           _pooling))  # fmt: skip
register_method(MethodSpec("fastv", "llm", "FastV: prune image tokens at LLM layer K by last-token attention",
                           {"layer": 2, "equivalent": False}, _fastv))  # fmt: skip
register_method(MethodSpec(
    "globalcom2+fastv", "vision+llm", "GlobalCom² per-crop budgets r_j, FastV token choice inside each crop",
    {"layer": 2, "allocation": "softmax-sum", "tau": 10.0, "score": "logits", "importance": "auto"},
    _globalcom2_fastv,
))  # fmt: skip


def apply_method(
    model: Any, processor: Any = None, method: str = "globalcom2", *, ratio: float = 0.25, **options: Any
) -> GlobalComHandle:
    """Patch ``model``/``processor`` in place for ``method`` at retention ratio ``ratio``; return the handle.

    Args:
        model: ``LlavaNextForConditionalGeneration`` (``method="globalcom2"``: every family of
            :func:`globalcom2.apply`).
        processor: its ``LlavaNextProcessor`` (needed by the pre-LLM methods, which change the placeholder count;
            optional for the LLM-side ones).
        method: one of :func:`available_methods`.
        ratio: R in (0, 1].
        options: the method's options (see ``METHODS[method].options``); unknown names are a TypeError.

    Returns:
        A :class:`~globalcom2.GlobalComHandle` whose ``.method`` and ``.method_options`` (R and the method's
        options) describe the method.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(spec.options)}"
        )
    if spec.adapter is None:
        from ..apply import apply

        return apply(model, processor, ratio=ratio, **options)
    adapter = spec.adapter(model, processor, ratio=ratio, **options)
    return install(adapter, method=method, method_options={"ratio": adapter.config.ratio, **spec.options,
                                                           **options})  # fmt: skip
