"""What the explorer computes, without the page: plans, overlays, counts, FLOPs and the plan JSON.

One request (an image, methods, a budget R or T, GlobalCom²'s options) gives one :class:`ExploreResult`:

- the plans: :func:`globalcom2.evaluation.visual.method_plan`, what ``globalcom2 visualize --methods`` draws (for
  GlobalCom² the family's own ``plan_for_image``, the plan ``globalcom2 visualize`` draws);
- the picture: one Figure-7 panel per method (:func:`globalcom2.workflows.render_plan`) side by side
  (:func:`globalcom2.viz.overlay.render_grid`), the same drawing code as ``visualize``;
- the records: per method :func:`globalcom2.evaluation.visual.method_record` (the panel's own numbers,
  :func:`globalcom2.viz.numbers.figure_summary`) plus the paper's prefill FLOPs of LLaVA-NeXT-7B for that many
  visual tokens (Sec. 5.4, :func:`globalcom2.bench.flops.paper_prefill_flops`);
- the page's tables (:func:`counts_markdown`) and the downloadable JSON (:func:`plan_json`) are both written from
  those records, so the page, the picture and the file state the same numbers.

Bad input (an unreadable upload, a budget out of range, an option a method refuses) raises :class:`ExploreError`
with a one-line message for the page; one failing method among several is a note, the others are still shown.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cli_common import CLIError

__all__ = ["ExploreError", "ExploreRequest", "ExploreResult", "Explorer", "counts_markdown", "load_upload",
           "plan_json"]  # fmt: skip

#: The smallest side (pixels) below which the page warns that the image says little: one 14-px patch.
_TINY_SIDE = 14
#: GlobalCom²'s options that the page offers, in the order of ``globalcom2 visualize``'s flags.
OPTION_NAMES = ("mode", "allocation", "scoring", "score", "importance", "alpha", "tau")


class ExploreError(ValueError):
    """Bad input to the explorer: its message is shown in the page as it is."""


@dataclass(frozen=True)
class ExploreRequest:
    """One request of the page.

    Attributes:
        methods: method names (:data:`globalcom2.methods.METHODS`), one panel each, in this order.
        ratio: R in (0, 1], or None when ``max_image_tokens`` is given.
        max_image_tokens: T, a per-image token budget, instead of ``ratio``.
        options: GlobalCom²'s options (:data:`OPTION_NAMES`); baselines take the ones they accept.
        family: the stand-in's family (ignored for a checkpoint).
        question: the prompt of the LLM-side methods (FastV, PDrop, SparseVLM).
    """

    methods: tuple[str, ...]
    ratio: float | None = 0.25
    max_image_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    family: str = "llava_next"
    question: str = "What is shown in this image?"


@dataclass
class ExploreResult:
    """What the page shows for one request."""

    picture: Any  # PIL image: the panels side by side
    records: list[dict[str, Any]]  # one per method that ran: its plan's numbers, FLOPs included
    notes: list[
        str
    ]  # things the user should know (a method refused, a tiny image, the stand-in's random LLM)
    payload: dict[str, Any]  # the downloadable JSON

    @property
    def markdown(self) -> str:
        return counts_markdown(self.records)


def load_upload(path: str | Path) -> Any:
    """An uploaded file as an 8-bit RGB PIL image (:func:`globalcom2.cli.load_image`); unreadable: ExploreError
    naming the file by its own name, not the server's temporary path."""
    from ..cli import load_image

    try:
        return load_image(str(path))
    except CLIError as err:
        raise ExploreError(str(err).replace(str(path), Path(path).name)) from None


def _tflops(num_tokens: int) -> float:
    from ..bench.flops import paper_prefill_flops

    return paper_prefill_flops(num_tokens) / 1e12


def _flops_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The paper's LLaVA-NeXT-7B prefill TFLOPs (LLM, visual tokens only) for the record's counts.

    LLM-side methods change the count from layer to layer, so one count does not give their FLOPs: None there.
    """
    if record["stage"] != "vision":
        return {"prefill_tflops_7b": None, "prefill_tflops_7b_full": _tflops(record["num_tokens_full"])}
    return {
        "prefill_tflops_7b": _tflops(record["num_tokens"]),
        "prefill_tflops_7b_full": _tflops(record["num_tokens_full"]),
    }


def _tf(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def counts_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The page's tables, written from ``records`` only (the JSON's ``plans``): token counts and FLOPs per method,
    then r_j and k_j / N_j per crop (a row per crop, a column per method)."""
    if not records:
        return ""
    lines = [
        "| method | R | image tokens | of | thumbnail | crops | layout | prefill TFLOPs (7B) | full TFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['ratio']:.4g} | {r['num_tokens']} | {r['num_tokens_full']} | "
            f"{r['thumbnail_tokens']} | {r['crops_tokens']} | {r['newline_tokens']} | "
            f"{_tf(r['prefill_tflops_7b'])} | {_tf(r['prefill_tflops_7b_full'])} |"
        )
    width = max(len(r["crop_tokens"]) for r in records)
    if width:  # one row per crop (grids reach 12 crops and more), one column per method
        lines += ["", "per crop (row-major): r_j, kept k_j / valid N_j", "",
                  "| crop | " + " | ".join(r["method"] for r in records) + " |", "|---|" + "---|" * len(records)]  # fmt: skip
        for j in range(width):
            cells = [
                f"{r['crop_ratios'][j]:.3f}, {r['crop_tokens'][j]}/{r['crop_cells'][j]}"
                if j < len(r["crop_tokens"])
                else ""
                for r in records
            ]
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_json(result: ExploreResult) -> str:
    """The downloadable plan file: the request, the image and the same records the page's tables show."""
    return json.dumps(result.payload, indent=2)


class Explorer:
    """The app's state shared by every browser session: the model (one per stand-in family, loaded on first use)
    and a lock, since :func:`globalcom2.apply` patches that one model instance for the length of a request.

    Args:
        model: ``"standin"`` (the offline DINOv2 stand-in with a tiny random LLM) or a checkpoint path / hub id.
        family: the stand-in family loaded first (a checkpoint's family comes from its class).
        dtype, device: as for :func:`globalcom2.loading.load_model_and_processor`.
    """

    def __init__(self, model: str = "standin", *, family: str = "llava_next", dtype: str = "auto",
                 device: str = "cpu") -> None:  # fmt: skip
        self.model_name = str(model)
        self.default_family = family
        self.dtype, self.device = dtype, device
        self._models: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    @property
    def standin(self) -> bool:
        return self.model_name == "standin"

    def families(self) -> tuple[str, ...]:
        """The families the page offers: every stand-in family, or the checkpoint's model class."""
        from ..loading import FAMILIES

        if self.standin:
            return tuple(FAMILIES)
        return (type(self.load()[0]).__name__,)

    def load(self, family: str | None = None) -> tuple[Any, Any]:
        """``(model, processor)`` of ``family`` (stand-in) or of the checkpoint, loaded once. Call with the lock
        held or before serving."""
        from ..loading import FAMILIES, load_model_and_processor

        key = (family or self.default_family) if self.standin else "checkpoint"
        if self.standin and key not in FAMILIES:
            raise ExploreError(f"family must be one of {', '.join(FAMILIES)}, got {key!r}")
        if key not in self._models:
            self._models[key] = load_model_and_processor(
                self.model_name, dtype=self.dtype, device=self.device, family=key
            )
        return self._models[key]

    def run(self, image: Any, image_name: str, request: ExploreRequest,
            progress: Callable[[float, str], None] | None = None) -> ExploreResult:  # fmt: skip
        """Plans, picture and records of ``request`` on ``image`` (see the module docstring)."""
        from ..config import GlobalComConfig
        from ..methods import METHODS

        if not request.methods:
            raise ExploreError(f"choose at least one method ({', '.join(METHODS)})")
        unknown = [m for m in request.methods if m not in METHODS]
        if unknown:
            raise ExploreError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        options = {k: request.options[k] for k in OPTION_NAMES if k in request.options}
        try:  # the budget and GlobalCom²'s options are checked before any model runs
            GlobalComConfig(ratio=request.ratio, max_image_tokens=request.max_image_tokens, **options)
        except (TypeError, ValueError) as err:
            raise ExploreError(str(err)) from None
        notes = []
        if min(image.width, image.height) < _TINY_SIDE:
            notes.append(
                f"the image is {image.width}x{image.height} px, smaller than one vision patch: the processor "
                "upscales it, so which tokens survive says nothing about its content"
            )
        with self._lock:
            model, processor = self.load(request.family)
            panels, records = [], []
            for k, method in enumerate(request.methods):
                if progress is not None:
                    progress(k / len(request.methods), f"{method} ({k + 1}/{len(request.methods)})")
                try:
                    plan = self._plan(model, processor, image, method, request, options)
                except (TypeError, ValueError) as err:  # the method refuses this model, budget or option
                    notes.append(f"{method}: {str(err).splitlines()[0]}")
                    continue
                panels.append(self._panel(image, image_name, plan, model, method, request))
                records.append(self._record(method, plan, request))
        if not records:
            raise ExploreError("no method could run: " + "; ".join(notes))
        from ..viz.overlay import render_grid

        picture = panels[0] if len(panels) == 1 else render_grid([(None, p) for p in panels],
                                                                 ncols=min(len(panels), 3))  # fmt: skip
        if self.standin and any(r["stage"] != "vision" for r in records):
            notes.append(
                "the stand-in's LLM is random: the LLM-side methods' choices show the mechanism only"
            )
        payload = {
            "model": self.model_name,
            "family": request.family if self.standin else type(model).__name__,
            "image": {"name": image_name, "width": image.width, "height": image.height},
            "request": {**asdict(request), "options": options},
            "flops_note": "prefill TFLOPs of LLaVA-NeXT-7B's LLM for this many visual tokens (the paper's "
            "formula, Sec. 5.4); n/a for methods that prune inside the LLM",
            "notes": notes,
            "plans": records,
        }
        return ExploreResult(picture=picture, records=records, notes=notes, payload=payload)

    @staticmethod
    def _plan(model: Any, processor: Any, image: Any, method: str, request: ExploreRequest,
              options: dict[str, Any]) -> Any:  # fmt: skip
        """``method``'s plan: what ``globalcom2 visualize --methods`` computes (GlobalCom² itself: the same plan as
        ``globalcom2 visualize``)."""
        from ..evaluation.visual import _options_for, method_plan

        return method_plan(model, processor, image, method, request.ratio, question=request.question,
                           max_image_tokens=request.max_image_tokens, **_options_for(method, options))  # fmt: skip

    def _panel(self, image: Any, image_name: str, plan: Any, model: Any, method: str,
               request: ExploreRequest) -> Any:  # fmt: skip
        from ..evaluation.visual import method_label
        from ..workflows import render_plan

        label = method_label(method, _ratio(plan, request), random_llm=self.standin,
                             max_image_tokens=request.max_image_tokens)  # fmt: skip
        return render_plan(image, plan, model, f"{image_name} ({image.width}x{image.height}): {label}")

    @staticmethod
    def _record(method: str, plan: Any, request: ExploreRequest) -> dict[str, Any]:
        from ..evaluation.visual import method_record

        record = method_record(method, _ratio(plan, request), plan, request.max_image_tokens)
        record["max_image_tokens"] = request.max_image_tokens  # also under R: the JSON's keys do not vary
        return {**record, **_flops_fields(record)}


def _ratio(plan: Any, request: ExploreRequest) -> float:
    """The R a plan used: its own (under a token budget, the R that fits) or the request's."""
    ratio = plan.ratio if plan.ratio is not None else request.ratio
    assert ratio is not None, "a plan under a token budget records its R"
    return float(ratio)


def internal_error(err: BaseException) -> str:
    """The page's line for a bug (the traceback goes to the server's stderr)."""
    traceback.print_exception(err, file=sys.stderr)
    first = str(err).splitlines()[0] if str(err) else ""
    return f"internal error: {type(err).__name__}: {first} (the server's log has the traceback)"
