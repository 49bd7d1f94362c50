"""Figure-7-style side-by-side comparison of methods (`globalcom2 visualize --methods ...`).

Each panel is :func:`globalcom2.viz.overlay.render_overlay` of one method's `Plan` on the same image: discarded
tokens greyed, crop borders, r_j and kept/N_j per crop. Pooling discards nothing (every cell is averaged into a
pooled token), so its panel shows no grey cells and says "N tokens averaged into M". LLM-side methods (FastV,
GlobalCom²+FastV) run one prefill with a question, since their choice depends on the prompt; their counts are the
image tokens that reach the LLM's layers after the pruning layer. The panels and the ``--json`` records state the
same numbers: both come from :func:`globalcom2.viz.numbers.panel_numbers` (:func:`method_record`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapters.errors import UnsupportedModelError
from ..core.plan import Plan


@torch.no_grad()
def method_plan(
    model: Any, processor: Any, image: Any, method: str, ratio: float | None, *, question: str,
    max_image_tokens: int | None = None, **options: Any,
) -> Plan:  # fmt: skip
    """The `Plan` of ``method`` for one image on any family: the family's own vision pass
    (:meth:`~globalcom2.adapters.family.FamilyAdapter.plan_for_image`), or one prefill for LLM-side methods."""
    from ..adapters import adapter_for
    from ..methods import METHODS, apply_method
    from ..workflows import default_prompt

    with apply_method(
        model, processor, method, ratio=ratio, max_image_tokens=max_image_tokens, **options
    ) as handle:
        if METHODS[method].stage == "vision":
            return handle.adapter.plan_for_image(handle, image)
        inputs = processor(images=[image], text=[default_prompt(processor, question)], return_tensors="pt",
                           **adapter_for(model).plan_processor_kwargs)  # fmt: skip
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        model(**inputs, logits_to_keep=1)
        if not handle.plans:  # positions only (methods.pruner.PositionsOnly): nothing says where a token sits
            raise UnsupportedModelError(
                f"{method} runs on {type(model).__name__} from the image-token positions alone; without the "
                "family's token layout there is no per-image plan to draw"
            )
        return handle.plans[0]


def method_label(method: str, ratio: float | None, *, random_llm: bool = False,
                 max_image_tokens: int | None = None) -> str:  # fmt: skip
    """A panel's title after the image name: the method, what it does with the tokens where that is not a
    selection before the LLM, and R."""
    from ..methods import METHODS

    spec = METHODS[method]
    notes = []
    if method == "pooling":
        notes.append("averaged, nothing discarded")
    if not spec.uses_ratio:
        notes.append("adaptive count, R not used")
    if spec.stage != "vision" and "layer" not in spec.options:
        notes.append("pruned in the LLM in stages, layer average R")
    elif spec.stage != "vision":
        notes.append(f"pruned in the LLM at layer {spec.options.get('layer', 2)}")
        if random_llm:
            notes.append("random LLM")
    extra = f" ({'; '.join(notes)})" if notes else ""
    budget = f"T = {max_image_tokens} tokens" if max_image_tokens is not None else f"R = {ratio:.0%}"
    if max_image_tokens is not None and ratio is not None:
        budget += f", R = {ratio:.1%}"
    return f"{method}{extra}, {budget}"


def method_record(
    method: str, ratio: float | None, plan: Plan, max_image_tokens: int | None = None
) -> dict[str, Any]:
    """The ``--json`` record of one panel: :func:`globalcom2.viz.numbers.figure_summary` (the panel's numbers)."""
    from ..methods import METHODS
    from ..viz.numbers import figure_summary

    record = {"method": method, "stage": METHODS[method].stage, "ratio": ratio, **figure_summary(plan)}
    if max_image_tokens is not None:
        record["max_image_tokens"] = max_image_tokens
    return record


def _options_for(
    method: str, gc_options: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The options ``method`` gets: the GlobalCom² options of the command line (GlobalCom² and its combinations),
    then the ``--method-option`` values it has (:func:`parse_method_options`)."""
    from ..methods import METHODS

    allowed = set(METHODS[method].options)
    if method == "globalcom2":
        out = dict(gc_options)
    else:
        out = {k: v for k, v in gc_options.items()
               if k in allowed - {"mode"} and method.startswith("globalcom2+")}  # fmt: skip
    out.update({k: v for k, v in (extra or {}).items() if k in allowed})
    return out


def parse_option_value(text: str) -> Any:
    """A ``--method-option`` value: an int, a float, true/false, none, or comma-separated ints (a tuple)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if "," in text:
        return tuple(parse_option_value(t) for t in text.split(",") if t.strip())
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_method_options(items: list[str] | None, methods: list[str]) -> dict[str, Any]:
    """``["layers=1,2,3", "seed=4"]`` as options; each must be an option of at least one of ``methods``."""
    from ..cli_common import CLIError
    from ..methods import METHODS

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--method-option takes KEY=VALUE, got {item!r}")
        owners = [m for m in methods if key in METHODS[m].options]
        if not owners:
            known = sorted({k for m in methods for k in METHODS[m].options})
            raise CLIError(f"--method-option {key!r} is an option of none of {', '.join(methods)}; "
                           f"their options: {', '.join(known) or 'none'}")  # fmt: skip
        out[key] = parse_option_value(value)
    return out


def checkpoint_facts(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """(family registry name, LLM depth) known before loading: the stand-in's, or read from a checkpoint's config
    (None where the config cannot be read: the load then reports it)."""
    from ..adapters.registry import ADAPTERS

    if args.model == "standin":
        import inspect

        from ..loading import load_standin

        return args.family, int(inspect.signature(load_standin).parameters["llm_layers"].default)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
    except Exception:  # noqa: BLE001 - unreadable here: the model load says why, with its own message
        return None, None
    names = list(getattr(config, "architectures", None) or [])
    family = next((f for f, cls in ADAPTERS.items() if getattr(cls, "model_class_name", None) in names), None)
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", None)
    return family, int(layers) if layers else None


def check_methods_early(args: argparse.Namespace, methods: list[str], gc_options: dict[str, Any]) -> None:
    """Every check that needs no model (family support, ``max_image_tokens``, options, schedules at each R), so a
    bad command fails in a second instead of after the model has loaded."""
    from ..cli_common import CLIError
    from ..methods import check_method

    family, layers = checkpoint_facts(args)
    tokens = getattr(args, "max_image_tokens", None)
    ratios = (None,) if tokens is not None else (args.ratios or (args.ratio,))
    for method in methods:
        options = _options_for(method, gc_options, args.method_option)
        for ratio in ratios:
            try:
                check_method(
                    method, family, ratio=ratio, max_image_tokens=tokens, num_layers=layers, **options
                )
            except (TypeError, ValueError) as err:
                where = f" on {family}" if family else ""
                raise CLIError(f"--methods {method}{where}: {err}") from None


def cmd_visualize_methods(args: argparse.Namespace, gc_options: dict[str, Any], *, load_image: Callable,
                          load_model: Callable) -> int:  # fmt: skip
    """`globalcom2 visualize --methods ...`: check everything that can be checked, then load (with the command
    line's ``load_image`` / ``load_model``) and draw."""
    methods = parse_methods(args.methods)  # unknown names fail before anything loads
    args.method_option = parse_method_options(getattr(args, "method_option", None), methods)
    check_methods_early(args, methods, gc_options)
    image = load_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
    return visualize_methods(args, methods, image, model, processor, gc_options)


def parse_methods(text: str) -> list[str]:
    """``"a,b,c"`` as method names, each checked against :data:`globalcom2.methods.METHODS`."""
    from ..cli_common import CLIError
    from ..methods import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    if not methods:
        raise CLIError(f"--methods names no method; available: {', '.join(METHODS)}")
    return methods


def visualize_methods(
    args: argparse.Namespace, methods: list[str], image: Any, model: Any, processor: Any,
    gc_options: dict[str, Any],
) -> int:  # fmt: skip
    """`globalcom2 visualize --methods a,b,c`: one row of panels per ratio, one column per method.

    The command line (:func:`globalcom2.cli.cmd_visualize`) parses ``methods`` with :func:`parse_methods` and
    loads ``image``, ``model`` and ``processor``; ``gc_options`` are the GlobalCom² options from the command line.
    """
    from ..viz.overlay import render_grid
    from ..workflows import render_plan

    tokens = getattr(args, "max_image_tokens", None)
    ratios: tuple[float | None, ...] = (None,) if tokens is not None else (args.ratios or (args.ratio,))
    extra = getattr(args, "method_option", None) or {}
    panels, records = [], []
    for ratio in ratios:
        for method in methods:
            plan = method_plan(model, processor, image, method, ratio, question=args.question,
                               max_image_tokens=tokens, **_options_for(method, gc_options, extra))  # fmt: skip
            shown = plan.ratio if ratio is None else ratio
            label = method_label(method, shown, random_llm=args.model == "standin", max_image_tokens=tokens)
            panels.append((None, render_plan(image, plan, model, f"{Path(args.image).name}: {label}")))
            records.append(method_record(method, shown, plan, tokens))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one row per ratio; a single ratio wraps after three panels so each stays readable
    render_grid(panels, out, ncols=len(methods) if len(ratios) > 1 else min(len(methods), 3))
    if args.json:
        print(json.dumps({"out": str(out), "plans": records}, indent=2))
    else:
        for r in records:
            if r["reduction"] == "averaged":
                crops = f"per crop {r['crop_cells']} tokens averaged into {r['crop_tokens']}"
            else:
                crops = f"kept per crop {r['crop_tokens']} of {r['crop_cells']}"
            budget = f"T={r['max_image_tokens']} " if "max_image_tokens" in r else ""
            text = "R=—" if r["ratio"] is None else f"R={r['ratio']:.0%}"
            print(f"{r['method']:<20} {budget}{text}: {r['num_tokens']}/{r['num_tokens_full']} image tokens, "
                  f"{crops}")  # fmt: skip
        print(f"wrote {out}")
    return 0
