"""Baselines and combinations behind one API: ``apply_method(model, processor, method=..., ratio=...)``.

Every method patches the model (and, for pre-LLM methods, the processor) in place and returns the same
:class:`~globalcom2.GlobalComHandle` as :func:`globalcom2.apply`: ``.plans`` after each forward (one
:class:`~globalcom2.Plan` per image), ``.remove()`` and the context-manager form. ``handle.method`` names the method
and ``handle.method_options`` holds its options.

| method | stage | what it keeps |
|---|---|---|
| ``globalcom2`` | vision | GlobalCom² itself (:func:`globalcom2.apply`, every option) |
| ``fastervlm`` | vision | per tile, top tokens by the tile's own [CLS] attention at uniform R |
| ``random`` | vision | the same counts as GlobalCom² budget mode, drawn at random per tile |
| ``pooling`` | vision | each tile average-pooled to about R of its tokens |
| ``fastv`` | LLM | from layer K on, the image tokens the last prompt token attends to most |
| ``globalcom2+fastv`` | vision + LLM | GlobalCom²'s per-crop counts, FastV's choice inside each crop (paper Fig. 8) |
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..adapters import adapter_for
from ..adapters.base import GlobalComHandle, existing_handle
from ..config import GlobalComConfig

__all__ = ["METHODS", "MethodSpec", "apply_method", "available_methods", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, where it acts, its options (name -> default) and its installer."""

    name: str
    stage: str  # "vision", "llm" or "vision+llm"
    description: str
    options: dict[str, Any]
    install: Callable[..., GlobalComHandle]


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Register a method; a duplicate name is an error."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


def available_methods() -> list[str]:
    return list(METHODS)


def _check_llava_next(model: Any, method: str) -> None:
    """Baselines are written for LLaVA-NeXT; other families get a TypeError before anything is patched."""
    from ..adapters.llava_next import LlavaNextAdapter

    adapter_for(model)  # unsupported models: the same TypeError as globalcom2.apply
    if not LlavaNextAdapter.is_supported(model):
        raise TypeError(
            f"method {method!r} supports {LlavaNextAdapter.model_class_name} only, got {type(model).__name__} "
            "(method='globalcom2' supports every family of globalcom2.apply)"
        )


def _check_free(model: Any, processor: Any) -> None:
    for obj, what in ((model, "model"), (processor, "processor")):
        if obj is not None and existing_handle(obj) is not None:
            raise ValueError(
                f"GlobalCom² is already applied to this {what}; call .remove() on its handle first"
            )


def _install(method: Any, model: Any, processor: Any, cfg: GlobalComConfig) -> GlobalComHandle:
    """The :func:`globalcom2.apply` sequence for any method object: check everything, then patch, then mark."""
    _check_free(model, processor)
    method.check()
    handle = GlobalComHandle(model, processor, cfg)
    handle.adapter = method  # type: ignore[attr-defined]
    try:
        method.install(handle)
        handle.mark()
    except BaseException:
        handle.remove()
        raise
    return handle


def _vision_method(name: str, adapter_attr: str, **fixed: Any) -> Callable[..., GlobalComHandle]:
    def install(model: Any, processor: Any, *, ratio: float, **options: Any) -> GlobalComHandle:
        from . import vision

        _check_llava_next(model, name)
        extra = {k: options.pop(k) for k in ("seed",) if k in options}
        if "seed" in extra and (
            isinstance(extra["seed"], bool) or not isinstance(extra["seed"], numbers.Integral)
        ):
            raise TypeError(f"`seed` must be an int, got {type(extra['seed']).__name__} {extra['seed']!r}")
        cfg = GlobalComConfig.from_kwargs(None, ratio=ratio, **{**fixed, **options})
        adapter = getattr(vision, adapter_attr)(model, processor, cfg)
        for key, value in extra.items():
            setattr(adapter, key, value)
        return _install(adapter, model, processor, cfg)

    return install


def _install_globalcom2(model: Any, processor: Any, *, ratio: float, **options: Any) -> GlobalComHandle:
    from ..apply import apply

    return apply(model, processor, ratio=ratio, **options)


def _check_layer(layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"`layer` must be an int, got {type(layer).__name__} {layer!r}")
    return int(layer)


def _install_fastv(
    model: Any, processor: Any, *, ratio: float, layer: int = 2, equivalent: bool = False
) -> GlobalComHandle:
    from .fastv import FastVMethod

    _check_llava_next(model, "fastv")
    cfg = GlobalComConfig(ratio=ratio)
    method = FastVMethod(
        model, processor, ratio=cfg.ratio, layer=_check_layer(layer), equivalent=bool(equivalent)
    )
    return _install(method, model, processor, cfg)


def _install_globalcom2_fastv(
    model: Any, processor: Any, *, ratio: float, layer: int = 2, **options: Any
) -> GlobalComHandle:
    from .fastv import GlobalComFastVMethod

    _check_llava_next(model, "globalcom2+fastv")
    cfg = GlobalComConfig.from_kwargs(None, ratio=ratio, mode="budget", **options)
    method = GlobalComFastVMethod(model, processor, cfg, layer=_check_layer(layer))
    return _install(method, model, processor, cfg)


_GC_OPTIONS = {"mode": "budget", "allocation": "softmax-sum", "scoring": "holistic", "alpha": 0.5, "tau": 10.0,
               "score": "logits", "importance": "auto"}  # fmt: skip

register_method(MethodSpec("globalcom2", "vision", "GlobalCom² (paper Sec. 4)", dict(_GC_OPTIONS),
                           _install_globalcom2))  # fmt: skip
register_method(MethodSpec(
    "fastervlm", "vision", "per-tile [CLS]-attention top-k at uniform R (FasterVLM-style)",
    {"mode": "budget", "score": "softmax", "importance": "auto"},
    _vision_method("fastervlm", "FasterVLMAdapter", allocation="uniform", scoring="local", score="softmax"),
))  # fmt: skip
register_method(MethodSpec(
    "random", "vision", "random tokens per tile, GlobalCom² budget counts at uniform R", {"seed": 0},
    _vision_method("random", "RandomAdapter", allocation="uniform", scoring="local"),
))  # fmt: skip
register_method(MethodSpec("pooling", "vision", "average pooling of every tile to about R of its tokens", {},
                           _vision_method("pooling", "PoolingAdapter")))  # fmt: skip
register_method(MethodSpec("fastv", "llm", "FastV: prune image tokens at LLM layer K by last-token attention",
                           {"layer": 2, "equivalent": False}, _install_fastv))  # fmt: skip
register_method(MethodSpec(
    "globalcom2+fastv", "vision+llm", "GlobalCom² per-crop budgets r_j, FastV token choice inside each crop",
    {"layer": 2, "allocation": "softmax-sum", "tau": 10.0, "score": "logits", "importance": "auto"},
    _install_globalcom2_fastv,
))  # fmt: skip


def apply_method(
    model: Any, processor: Any = None, method: str = "globalcom2", *, ratio: float = 0.25, **options: Any
) -> GlobalComHandle:
    """Patch ``model``/``processor`` in place for ``method`` at retention ratio ``ratio``; return the handle.

    Args:
        model: ``LlavaNextForConditionalGeneration``.
        processor: its ``LlavaNextProcessor`` (needed by the pre-LLM methods, which change the placeholder count).
        method: one of :func:`available_methods`.
        ratio: R in (0, 1].
        options: the method's options (see ``METHODS[method].options``); unknown names are a TypeError.

    Returns:
        A :class:`~globalcom2.GlobalComHandle` with ``.method`` and ``.method_options`` set.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(spec.options)}"
        )
    handle = spec.install(model, processor, ratio=ratio, **options)
    handle.method = method  # type: ignore[attr-defined]
    handle.method_options = {**spec.options, **options}  # type: ignore[attr-defined]
    return handle
