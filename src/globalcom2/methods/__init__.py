"""Baselines and combinations behind one API: ``apply_method(model, processor, method=..., ratio=...)``.

Also exported at the top level: ``globalcom2.apply_method`` is :func:`globalcom2.methods.apply_method`.

Every method is a family adapter installed by the one install path of :func:`globalcom2.apply`
(:func:`globalcom2.adapters.base.install`), so it returns the same :class:`~globalcom2.GlobalComHandle`: ``.plans``
after each forward (one :class:`~globalcom2.Plan` per image), ``.remove()`` and the context-manager form;
``handle.method`` names the method and ``handle.method_options`` holds its options. A baseline is the GlobalCom²
pipeline with one step swapped:

| method | stage | what it keeps | what is swapped |
|---|---|---|---|
| ``globalcom2`` | vision | GlobalCom² itself (:func:`globalcom2.apply`, every option) | nothing |
| ``fastervlm`` | vision | per tile, top tokens by the tile's own score at uniform R: its [CLS] attention (Eq. 1) where the tower has a [CLS], else Eq. 7 | the config |
| ``random`` | vision | the same counts as GlobalCom² budget mode, drawn at random per tile | the scores |
| ``pooling`` | vision | each tile average-pooled to about R of its tokens | count and packing |
| ``prumerge`` | vision | per tile, the [CLS]-attention outliers (IQR rule), pruned tokens merged in by key kNN | all |
| ``prumerge+`` | vision | ``prumerge`` plus spatially uniform samples per tile | all |
| ``fastv`` | LLM | from layer K on, the image tokens the last prompt token attends to most | LLM-side pruning |
| ``pdrop`` | LLM | stage by stage, the image tokens the last instruction token attends to most (PyramidDrop) | LLM-side pruning |
| ``sparsevlm`` | LLM | stage by stage, the image tokens the text raters attend to most; dropped ones recycled | LLM-side pruning |
| ``globalcom2+fastv`` | vision + LLM | GlobalCom²'s per-crop counts, FastV's choice inside each crop (Fig. 8) | selection in crops |
| ``globalcom2+sparsevlm`` | vision + LLM | GlobalCom²'s per-crop counts, SparseVLM's choice inside each crop (Fig. 8) | selection in crops |

The LLM-side methods prune on the schedule of :mod:`globalcom2.methods.schedule`: ``pdrop`` and ``sparsevlm`` keep
the layer average of the image tokens equal to R (the paper's "equivalent token count"); ``fastv`` keeps the share R
from its layer K on unless ``equivalent=True``. ``Plan.layer_tokens`` records every layer's count. They need only
the image-token positions (markers such as ``<img>`` or ``<row_1_col_1>`` are not image tokens and are never
pruned); where the family's token layout is known (:mod:`globalcom2.methods.layout`) the plans also say which crop
each kept token belongs to, and the combinations need it.

PruMerge's count is adaptive (set by the image's attention, not by R): ``MethodSpec.uses_ratio`` is False and R is
only recorded (:mod:`globalcom2.methods.prumerge`).

Which family runs which method: ``MethodSpec.families`` (None: every family); :func:`support_matrix` is the table
(the README's is generated from it); any other pair is a TypeError before anything is patched.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..adapters import adapter_for
from ..adapters.base import GlobalComHandle, install
from ..adapters.errors import UnsupportedModelError
from ..adapters.registry import ADAPTERS
from ..config import DEFAULT_RATIO, GlobalComConfig
from .pruner import llm_method_class

__all__ = [
    "METHODS",
    "MethodSpec",
    "apply_method",
    "available_methods",
    "check_method",
    "method_support",
    "register_method",
    "support_matrix",
    "support_matrix_markdown",
]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, where it acts, its options (name -> default) and how to build its adapter.

    ``adapter(model, processor, ratio=..., **options)`` returns the adapter that
    :func:`~globalcom2.adapters.base.install` installs; None means :func:`globalcom2.apply` itself.
    ``max_image_tokens``: the adapter also takes ``max_image_tokens=T`` (then ``ratio=None``), a per-image token
    budget; methods without it refuse T with a TypeError.
    """

    name: str
    stage: str  # "vision", "llm" or "vision+llm"
    description: str
    options: dict[str, Any]
    adapter: Callable[..., Any] | None
    max_image_tokens: bool = False
    uses_ratio: bool = True  # False: the method's count does not depend on R (PruMerge), R is only recorded
    families: tuple[str, ...] | None = None  # registry names of the families it runs on; None: every family
    requires: Callable[[type], str | None] | None = (
        None  # what it needs of a family's adapter class: None or why not
    )
    note: str = ""  # what the support matrix says about its families (e.g. the score it uses)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Register a method; a duplicate name is an error."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


def available_methods() -> list[str]:
    return list(METHODS)


def method_support(method: str, family: str) -> str | None:
    """None when ``method`` runs on ``family`` (a registry name, e.g. ``"internvl"``), else why not (one line)."""
    reason = _why_not(method, family)
    return None if reason is None else f"method {method!r} is not implemented for {family}: {reason}"


def _why_not(method: str, family: str) -> str | None:
    spec = METHODS[method]
    if spec.families is not None and family not in spec.families:
        return f"written for {', '.join(spec.families)} only"
    return spec.requires(ADAPTERS[family]) if spec.requires is not None and family in ADAPTERS else None


def _tile_planner(cls: type) -> str | None:
    """The random baseline swaps the scores a family's tile planner ranks (``plan_images``)."""
    return (
        None if hasattr(cls, "plan_images") else "its adapter has no per-tile planner (plan_images) to feed"
    )


def _token_layout(cls: type) -> str | None:
    """The combinations give each crop GlobalCom²'s count, so they need the family's token layout."""
    from .pruner import has_token_layout

    if not has_token_layout(cls):
        return "the token layout of its image runs is not known (methods.layout)"
    return None


def _family(model: Any, method: str) -> Any:
    """The registry's adapter class for ``model``, which must run ``method`` (TypeError before any patch)."""
    family = adapter_for(model)  # unsupported models: the same TypeError as globalcom2.apply
    reason = method_support(method, family.family)
    if reason is not None:
        raise UnsupportedModelError(f"{reason}; got {type(model).__name__}")
    return family


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _fastervlm(model: Any, processor: Any, *, ratio: float | None, max_image_tokens: int | None = None,
               **options: Any) -> Any:  # fmt: skip
    from .vision import FASTERVLM

    family = _family(model, "fastervlm")
    budget = {"ratio": ratio, "max_image_tokens": max_image_tokens}
    cfg = GlobalComConfig.from_kwargs(None, **budget, **{**FASTERVLM, **options})
    return family(model, processor, cfg)


def _random(model: Any, processor: Any, *, ratio: float | None, max_image_tokens: int | None = None,
            seed: int = 0) -> Any:  # fmt: skip
    from .vision import RANDOM, random_class

    family = _family(model, "random")
    seed = _integer("seed", seed)
    cfg = GlobalComConfig(ratio=ratio, max_image_tokens=max_image_tokens, **RANDOM)
    return random_class(family)(model, processor, cfg, seed=seed)


def _pooling(model: Any, processor: Any, *, ratio: float | None,
             max_image_tokens: int | None = None) -> Any:  # fmt: skip
    from .pooling import pooling_class

    cls = pooling_class(_family(model, "pooling"))
    return cls(model, processor, GlobalComConfig(ratio=ratio, max_image_tokens=max_image_tokens))


def _pooling_rule(cls: type) -> str | None:
    """Pooling has a rule per token layout (anyres, InternVL's tiles, native grids: methods.pooling)."""
    from .pooling import pooling_rule

    return pooling_rule(cls)


def _fastv(model: Any, processor: Any, *, ratio: float, layer: int = 2, equivalent: bool = False) -> Any:
    from .fastv import FastVAdapter

    cls = llm_method_class(FastVAdapter, _family(model, "fastv"))
    cfg = GlobalComConfig(ratio=ratio)
    return cls(model, processor, cfg, layer=_integer("layer", layer), equivalent=bool(equivalent))


def _globalcom2_fastv(model: Any, processor: Any, *, ratio: float, layer: int = 2, **options: Any) -> Any:
    from .fastv import GlobalComFastVAdapter

    cls = llm_method_class(GlobalComFastVAdapter, _family(model, "globalcom2+fastv"))
    cfg = GlobalComConfig.from_kwargs(None, ratio=ratio, mode="budget", **options)
    return cls(model, processor, cfg, layer=_integer("layer", layer))


def _prumerge(plus: bool) -> Callable[..., Any]:
    def build(model: Any, processor: Any, *, ratio: float, **options: Any) -> Any:
        from .prumerge import PRUMERGE_OPTIONS, prumerge_class

        cls = prumerge_class(_family(model, "prumerge+" if plus else "prumerge"))
        # mode="reference": the adaptive count is known after the vision tower only (see methods/prumerge.py)
        cfg = GlobalComConfig(ratio=ratio, mode="reference")
        return cls(model, processor, cfg, plus=plus, **{**PRUMERGE_OPTIONS, **options})

    return build


_GC_OPTIONS = {"mode": "budget", "allocation": "softmax-sum", "scoring": "holistic", "alpha": 0.5, "tau": 10.0,
               "score": "logits", "importance": "auto"}  # fmt: skip

register_method(MethodSpec("globalcom2", "vision", "GlobalCom² (paper Sec. 4)", dict(_GC_OPTIONS), None,
                           max_image_tokens=True))  # fmt: skip
register_method(MethodSpec(
    "fastervlm", "vision", "per-tile top-k by the tile's own score at uniform R (FasterVLM-style)",
    {"mode": "budget", "score": "softmax", "importance": "auto"}, _fastervlm, max_image_tokens=True,
    note="Eq. 1 ([CLS] attention) where the tower has a [CLS], Eq. 7 otherwise",
))  # fmt: skip
register_method(MethodSpec(
    "random", "vision", "random tokens per tile, GlobalCom² budget counts at uniform R", {"seed": 0}, _random,
    max_image_tokens=True, requires=_tile_planner,
))  # fmt: skip
register_method(MethodSpec("pooling", "vision", "average pooling of every tile to about R of its tokens", {},
                           _pooling, max_image_tokens=True, requires=_pooling_rule))  # fmt: skip
#: what the support matrix says about the LLM-side methods
_LLM_NOTE = "hybrid LLMs (Qwen3.5): every scoring layer must be a full-attention layer (else TypeError)"
register_method(MethodSpec("fastv", "llm", "FastV: prune image tokens at LLM layer K by last-token attention",
                           {"layer": 2, "equivalent": False}, _fastv, note=_LLM_NOTE))  # fmt: skip
register_method(MethodSpec(
    "globalcom2+fastv", "vision+llm", "GlobalCom² per-crop budgets r_j, FastV token choice inside each crop",
    {"layer": 2, "allocation": "softmax-sum", "tau": 10.0, "score": "logits", "importance": "auto"},
    _globalcom2_fastv, requires=_token_layout, note=_LLM_NOTE,
))  # fmt: skip


def _layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`layers` must be a sequence of ints or None, got {type(value).__name__} {value!r}")
    return tuple(_integer("layers", v) for v in value)


def _pdrop(model: Any, processor: Any, *, ratio: float, stages: int = 4, lam: float = 0.5,
           layers: Any = None) -> Any:  # fmt: skip
    from .pdrop import PDropAdapter

    cls = llm_method_class(PDropAdapter, _family(model, "pdrop"))
    return cls(model, processor, GlobalComConfig(ratio=ratio), stages=_integer("stages", stages), lam=lam,
               layers=_layers(layers))  # fmt: skip


def _sparsevlm(model: Any, processor: Any, *, ratio: float, **options: Any) -> Any:
    from .sparsevlm import SparseVLMAdapter

    cls = llm_method_class(SparseVLMAdapter, _family(model, "sparsevlm"))
    options["layers"] = _layers(options.get("layers"))
    return cls(model, processor, GlobalComConfig(ratio=ratio), **options)


def _globalcom2_sparsevlm(model: Any, processor: Any, *, ratio: float, **options: Any) -> Any:
    from .sparsevlm import SPARSEVLM_OPTIONS, GlobalComSparseVLMAdapter

    cls = llm_method_class(GlobalComSparseVLMAdapter, _family(model, "globalcom2+sparsevlm"))
    ours = {k: options.pop(k) for k in list(options) if k in SPARSEVLM_OPTIONS}
    ours["layers"] = _layers(ours.get("layers"))
    cfg = GlobalComConfig.from_kwargs(None, ratio=ratio, mode="budget", **options)
    return cls(model, processor, cfg, **ours)


# = sparsevlm.SPARSEVLM_OPTIONS (tested)
_SV_OPTIONS = {"layers": None, "budget": "schedule", "scale": 13.5, "recycle": 0.3}
register_method(MethodSpec(
    "pdrop", "llm", "PyramidDrop: stage-wise drops by last-instruction-token attention, layer average R",
    {"stages": 4, "lam": 0.5, "layers": None}, _pdrop, note=_LLM_NOTE,
))  # fmt: skip
register_method(MethodSpec(
    "sparsevlm", "llm", "SparseVLM: text raters' attention, staged drops at layer average R, token recycling",
    dict(_SV_OPTIONS), _sparsevlm, note=_LLM_NOTE,
))  # fmt: skip
register_method(MethodSpec(
    "globalcom2+sparsevlm", "vision+llm", "GlobalCom² per-crop budgets r_j, SparseVLM token choice inside each crop",
    {**_SV_OPTIONS, "allocation": "softmax-sum", "tau": 10.0, "score": "logits", "importance": "auto"},
    _globalcom2_sparsevlm, requires=_token_layout, note=_LLM_NOTE,
))  # fmt: skip
_PM_OPTIONS = {"k": 32, "attention": "full", "extra_token": True}  # = prumerge.PRUMERGE_OPTIONS (tested)
_PM_NOTE = "needs a [CLS] attention (a tower without one: TypeError before patching)"


def _prumerge_rule(cls: type) -> str | None:
    """PruMerge needs a [CLS] attention and a per-tile rule for the family's layout (methods.prumerge)."""
    from .prumerge import prumerge_rule

    return prumerge_rule(cls)


register_method(MethodSpec(
    "prumerge", "vision", "PruMerge: per-tile [CLS]-attention outliers (IQR), pruned tokens merged by key kNN",
    dict(_PM_OPTIONS), _prumerge(plus=False), uses_ratio=False, requires=_prumerge_rule, note=_PM_NOTE,
))  # fmt: skip
register_method(MethodSpec(
    "prumerge+", "vision", "PruMerge+: PruMerge plus spatially uniform samples per tile",
    dict(_PM_OPTIONS), _prumerge(plus=True), uses_ratio=False, requires=_prumerge_rule, note=_PM_NOTE,
))  # fmt: skip


def check_method(
    method: str,
    family: str | None = None,
    *,
    ratio: float | None = None,
    max_image_tokens: int | None = None,
    num_layers: int | None = None,
    **options: Any,
) -> None:
    """Every check of :func:`apply_method` that needs no model, for a command line to run before it loads one.

    Args:
        method: the method's name.
        family: the model's family (registry name); None skips the support check.
        ratio, max_image_tokens: the budget, as for :func:`apply_method`.
        num_layers: the LLM's depth L; None skips the schedule check of the LLM-side methods.
        options: the method's options.

    Raises:
        ValueError: an unknown method, or a ratio the method's schedule cannot reach on an L-layer LLM.
        TypeError: an unknown option, a family the method does not run on, or ``max_image_tokens`` for a method
            without it.
    """
    from .schedule import fastv_schedule, pdrop_schedule, sparsevlm_schedule

    spec = _spec(method, options)
    if family is not None and (reason := method_support(method, family)) is not None:
        raise UnsupportedModelError(reason)
    if max_image_tokens is not None:
        _check_max_image_tokens(method)
    if num_layers is None or spec.stage == "vision":
        return
    r = DEFAULT_RATIO if ratio is None else ratio
    opts = {**spec.options, **options}
    if "layer" in opts:
        layer = _integer("layer", opts["layer"])
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"`layer` must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}"
            )
        fastv_schedule(num_layers, r, layer=layer, equivalent=bool(opts.get("equivalent", False)))
    elif method == "pdrop":
        pdrop_schedule(num_layers, r, stages=_integer("stages", opts["stages"]), lam=opts["lam"],
                       layers=_layers(opts["layers"]))  # fmt: skip
    else:
        sparsevlm_schedule(num_layers, r, layers=_layers(opts["layers"]))


def _spec(method: str, options: dict[str, Any]) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(spec.options)}"
        )
    return spec


def _check_max_image_tokens(method: str) -> None:
    if not METHODS[method].max_image_tokens:
        supported = ", ".join(repr(m) for m, s in METHODS.items() if s.max_image_tokens)
        raise TypeError(
            f"method {method!r} does not support max_image_tokens (supported: {supported}); pass ratio=..."
        )


def apply_method(
    model: Any,
    processor: Any = None,
    method: str = "globalcom2",
    *,
    ratio: float | None = None,
    max_image_tokens: int | None = None,
    **options: Any,
) -> GlobalComHandle:
    """Patch ``model``/``processor`` in place for ``method`` at retention ratio ``ratio``; return the handle.

    Also ``globalcom2.apply_method``.

    Args:
        model: a model of a supported family that runs ``method`` (:func:`support_matrix`; any other is a
            TypeError before anything is patched).
        processor: its processor (needed by the pre-LLM methods, which change the placeholder count, and on the
            families whose tile grid only the processor knows; optional for the LLM-side ones elsewhere).
        method: one of :func:`available_methods`.
        ratio: R in (0, 1] (default 0.25 unless ``max_image_tokens`` is given).
        max_image_tokens: instead of ``ratio``, at most T tokens per image at the largest R that fits (methods
            with ``METHODS[method].max_image_tokens``; the others raise a TypeError). Passing both is an error.
        options: the method's options (see ``METHODS[method].options``); unknown names are a TypeError.

    Returns:
        A :class:`~globalcom2.GlobalComHandle` whose ``.method`` and ``.method_options`` (R and the method's
        options) describe the method.
    """
    spec = _spec(method, options)
    if spec.adapter is None:
        from ..apply import apply

        return apply(model, processor, ratio=ratio, max_image_tokens=max_image_tokens, **options)
    budget: dict[str, Any] = {"ratio": DEFAULT_RATIO if ratio is None and max_image_tokens is None else ratio}
    if max_image_tokens is not None:
        _check_max_image_tokens(method)
        budget["max_image_tokens"] = max_image_tokens
    adapter = spec.adapter(model, processor, **budget, **options)
    return install(adapter, method=method, method_options={**budget, "ratio": adapter.config.ratio,
                                                           **spec.options, **options})  # fmt: skip


def support_matrix() -> dict[str, dict[str, str | None]]:
    """``{method: {family: None (runs) or why not}}`` over every registered method and family."""
    return {m: {f: method_support(m, f) for f in sorted(ADAPTERS)} for m in METHODS}


def support_matrix_markdown() -> str:
    """The method x family table of the README (generated from the registry; a test holds the README to it)."""
    families = sorted(ADAPTERS)
    lines = ["| method | stage | " + " | ".join(f"`{f}`" for f in families) + " | note |",
             "|---|---|" + "---|" * len(families) + "---|"]  # fmt: skip
    for name, spec in METHODS.items():
        cells = ["✓" if method_support(name, f) is None else "—" for f in families]
        lines.append(f"| `{name}` | {spec.stage} | " + " | ".join(cells) + f" | {spec.note} |")
    lines.append("")
    for name in METHODS:  # why not, where not: one line per method
        why: dict[str, list[str]] = {}
        for f in families:
            reason = _why_not(name, f)
            if reason is not None:
                why.setdefault(reason, []).append(f)
        if why:
            lines.append(f"- `{name}`: " + "; ".join(f"{', '.join(fs)}: {r}" for r, fs in why.items()))
    return "\n".join(lines)
