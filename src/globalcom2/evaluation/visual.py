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
from pathlib import Path
from typing import Any

import torch

from ..core.plan import Plan


@torch.no_grad()
def method_plan(
    model: Any, processor: Any, image: Any, method: str, ratio: float, *, question: str, **options: Any
) -> Plan:
    """The `Plan` of ``method`` for one image (a vision pass, or one prefill for LLM-side methods)."""
    from ..methods import METHODS, apply_method
    from ..workflows import default_prompt

    with apply_method(model, processor, method, ratio=ratio, **options) as handle:
        if METHODS[method].stage == "vision":
            inputs = processor.image_processor(images=[image], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(model.device, model.dtype)
            model.model.get_image_features(pixel_values, inputs["image_sizes"].to(model.device))
        else:
            inputs = processor(
                images=[image], text=[default_prompt(processor, question)], return_tensors="pt"
            )
            inputs = inputs.to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            model(**inputs, logits_to_keep=1)
        return handle.plans[0]


def method_label(method: str, ratio: float, *, random_llm: bool = False) -> str:
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
    return f"{method}{extra}, R = {ratio:.0%}"


def method_record(method: str, ratio: float, plan: Plan) -> dict[str, Any]:
    """The ``--json`` record of one panel: :func:`globalcom2.viz.numbers.figure_summary` (the panel's numbers)."""
    from ..methods import METHODS
    from ..viz.numbers import figure_summary

    return {"method": method, "stage": METHODS[method].stage, "ratio": ratio, **figure_summary(plan)}


def _options_for(method: str, gc_options: dict[str, Any]) -> dict[str, Any]:
    from ..methods import METHODS

    if method == "globalcom2":
        return dict(gc_options)
    allowed = set(METHODS[method].options) - {"mode"}
    return {k: v for k, v in gc_options.items() if k in allowed and method.startswith("globalcom2+")}


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

    ratios = args.ratios or (args.ratio,)
    panels, records = [], []
    for ratio in ratios:
        for method in methods:
            plan = method_plan(model, processor, image, method, ratio, question=args.question,
                               **_options_for(method, gc_options))  # fmt: skip
            title = (
                f"{Path(args.image).name}: {method_label(method, ratio, random_llm=args.model == 'standin')}"
            )
            panels.append((None, render_plan(image, plan, model, title)))  # the panel's title names it
            records.append(method_record(method, ratio, plan))
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
            print(f"{r['method']:<18} R={r['ratio']:.0%}: {r['num_tokens']}/{r['num_tokens_full']} image tokens, "
                  f"{crops}")  # fmt: skip
        print(f"wrote {out}")
    return 0
