"""Outputs of `globalcom2 eval`: per-row CSV, averaged CSV, Markdown tables, JSON and plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ("llm_share", "thumb_mass", "crop_mass", "feat_cos", "feat_cos_centred", "share_cv", "share_min", "share_max",
           "share_mass_corr")  # fmt: skip
KEYS = ("group", "method", "ratio", "allocation", "scoring", "score")
METHOD_ORDER = ("globalcom2", "fastervlm", "random", "pooling", "prumerge", "prumerge+", "fastv",
                "globalcom2+fastv", "pdrop", "sparsevlm", "globalcom2+sparsevlm")  # fmt: skip
LLM_SIDE = ("fastv", "globalcom2+fastv", "pdrop", "sparsevlm", "globalcom2+sparsevlm")  # hatched: random LLM
COLORS = {"globalcom2": "#d62728", "fastervlm": "#1f77b4", "random": "#7f7f7f", "pooling": "#2ca02c",
          "fastv": "#9467bd", "globalcom2+fastv": "#ff7f0e", "prumerge": "#8c564b", "prumerge+": "#e377c2",
          "pdrop": "#17becf", "sparsevlm": "#bcbd22", "globalcom2+sparsevlm": "#7b4173"}  # fmt: skip


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every metric per (group, method, ratio, ablation setting) over photos (and random draws)."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        buckets[tuple(row.get(k, "") for k in KEYS)].append(row)
    out = []
    for key, items in buckets.items():
        agg = dict(zip(KEYS, key, strict=True))
        agg["n"] = len(items)
        agg["photos"] = len({r["photo"] for r in items})
        for m in METRICS:
            agg[m] = _nanmean([float(r[m]) for r in items])
        out.append(agg)
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f} %"


def _adaptive(method: str) -> bool:
    """A method whose count ignores R (PruMerge): the same row at every R, so it is listed once."""
    from ..methods import METHODS

    spec = METHODS.get(method)
    return spec is not None and not spec.uses_ratio


def _method_rows(agg: list[dict], group: str, ratios: list[float]) -> list[str]:
    head = ("| R | method | tokens to LLM | thumbnail mass kept | crop mass kept | feature cos | feature cos "
            "(centred) | crop share CV | crop share min–max | corr(share, mass) |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    # R-driven methods per R, then each adaptive method once (its rows are equal at every R).
    slots = [(r, m) for r in ratios for m in METHOD_ORDER if not _adaptive(m)]
    slots += [(ratios[0], m) for m in METHOD_ORDER if _adaptive(m)] if ratios else []
    for ratio, method in slots:
        for a in agg:
            if a["group"] == group and a["method"] == method and a["ratio"] == ratio:
                label = "adaptive" if _adaptive(method) else f"{ratio:.0%}"
                lines.append(
                    f"| {label} | {method} | {_pct(a['llm_share'])} | {_fmt(a['thumb_mass'])} | "
                    f"{_fmt(a['crop_mass'])} | {_fmt(a['feat_cos'])} | {_fmt(a['feat_cos_centred'])} | "
                    f"{_fmt(a['share_cv'], 2)} | "
                    f"{_fmt(a['share_min'], 2)}–{_fmt(a['share_max'], 2)} | {_fmt(a['share_mass_corr'], 2)} |"
                )
    return lines


def _ablation_rows(agg: list[dict], ratios: list[float], settings: list[list[str]]) -> list[str]:
    names = (("crop mass", "crop_mass"), ("feature cos", "feat_cos"), ("centred cos", "feat_cos_centred"))
    cols = " | ".join(f"{label} R={r:.0%}" for label, _ in names for r in ratios)
    lines = [
        f"| allocation (Table 2) | scoring (Table 3) | score | {cols} | crop share CV R={ratios[-1]:.0%} |"
    ]
    lines.append("|---|---|---|" + "---|" * (len(names) * len(ratios) + 1))
    index = {
        (a["allocation"], a["scoring"], a["score"], a["ratio"]): a for a in agg if a["group"] == "ablation"
    }
    for alloc, scoring, score in settings:
        cells = [index.get((alloc, scoring, score, r)) for r in ratios]
        if any(c is None for c in cells):
            continue
        values = " | ".join(_fmt(c[key]) for _, key in names for c in cells if c)
        last = cells[-1]
        cv = _fmt(last["share_cv"], 2) if last else "—"
        lines.append(f"| {alloc} | {scoring} | {score} | {values} | {cv} |")
    return lines


def markdown_report(agg: list[dict], summary: dict[str, Any], plot_names: list[str]) -> str:
    ratios = summary["ratios"]
    photos = summary["photos"]
    from ..demo.tiny_families import RANDOM_TOWER_FAMILIES

    if summary.get("family") in RANDOM_TOWER_FAMILIES:  # no stand-in fits the family's tower: a random one
        title = (
            "agreement with the uncompressed model on a random-tower stand-in (not fidelity, not accuracy)"
        )
    else:
        title = "fidelity on the DINOv2 stand-in"
    md = [f"# GlobalCom² evaluation: {title}", "", f"> {summary['note']}", ""]
    md += [f"Command: `{summary['command']}` ({summary['seconds']} s on {summary['machine']['threads']} CPU threads, "
           f"torch {summary['machine']['torch']}).", ""]  # fmt: skip
    md += [
        f"Photos ({len(photos)}): "
        + ", ".join(
            f"{p} ({v['size_hw'][1]}x{v['size_hw'][0]}, grid {v['grid'][0]}x{v['grid'][1]})"
            for p, v in photos.items()
        ),
        "",
    ]
    md += ["Every number is a mean over the photos (random: also over "
           f"{summary['random_draws']} draws). Definitions: docs/eval.md.", ""]  # fmt: skip
    md += ["## Methods (pre-LLM, same budget-mode token count except pooling)", ""]
    md += _method_rows(agg, "method", ratios)
    if summary["llm"]:
        md += [
            "",
            "## LLM-side methods on the tiny *random* LLM (mechanism only, not a quality comparison)",
            "",
        ]
        md += ["The LLM-side scores come from a randomly initialised 4-layer LLM (FastV prunes at layer K = 2), so "
               "which tokens they keep says nothing about the methods on a trained model; the rows show that the "
               "mechanisms run and how their per-crop counts behave. GlobalCom²+FastV keeps GlobalCom²'s per-crop "
               "counts by construction. PDrop and SparseVLM keep the layer average of the image tokens at R, so "
               "'tokens to LLM' is what reaches the last stage; on 4 layers R = 25 % and below is out of reach for "
               "them (no row).", ""]  # fmt: skip
        md += _method_rows(agg, "llm", ratios)
    for method, why in summary.get("methods_refused", {}).items():
        md += ["", f"Not run here: `{method}` with its default options ({why})."]
    md += ["", "## Ablations (paper Tables 2 and 3, budget mode)", ""]
    md += _ablation_rows(agg, ratios, summary["ablation_settings"])
    detail = _allocation_example(summary)
    if detail is not None:
        md += [
            "",
            f"## Per-crop kept share q_j = k_j / N_j: {detail['photo']}, R = {detail['ratio']:.0%}",
            "",
        ]
        n = len(detail["crop_mass"])
        md += ["| | " + " | ".join(f"crop {j + 1}" for j in range(n)) + " |", "|---|" + "---|" * n]
        md += ["| thumbnail mass M_j | " + " | ".join(f"{m:.3f}" for m in detail["crop_mass"]) + " |"]
        for method in METHOD_ORDER:
            if method in detail["share"]:
                md += [f"| {method} | " + " | ".join(f"{q:.3f}" for q in detail["share"][method]) + " |"]
    md += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(md)


def _allocation_example(summary: dict[str, Any]) -> dict | None:
    details = summary["allocation"]
    if not details:
        return None
    ratio = min(summary["ratios"])
    photos = list(summary["photos"])
    photo = "astronaut" if "astronaut" in photos else photos[0]
    return details.get(f"{photo}@{ratio}")


# -------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from ..extras import optional_imports

    with optional_imports("the evaluation plots"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_methods(agg: list[dict], ratios: list[float], path: Path) -> None:
    """Bar charts per R: crop attention mass kept and centred feature cosine, one bar per method."""
    panels = (("crop_mass", "crop attention mass kept"), ("feat_cos", "pooled-feature cosine"),
              ("feat_cos_centred", "pooled-feature cosine, centred"))  # fmt: skip
    fig = _figure(4.2 * len(ratios), 10.0)
    axes = fig.subplots(len(panels), len(ratios), squeeze=False)
    for col, ratio in enumerate(ratios):
        for row, (metric, label) in enumerate(panels):
            ax = axes[row][col]
            items = [(m, a) for m in METHOD_ORDER for a in agg
                     if a["method"] == m and a["ratio"] == ratio and a["group"] in ("method", "llm")]  # fmt: skip
            names = [m for m, _ in items]
            vals = [0.0 if math.isnan(a[metric]) else a[metric] for _, a in items]
            bars = ax.bar(range(len(items)), vals, color=[COLORS[m] for m in names])
            for bar, (_, a) in zip(bars, items, strict=True):
                if a["group"] == "llm":
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
                if math.isnan(a[metric]):
                    ax.text(
                        bar.get_x() + bar.get_width() / 2, 0.02, "n/a", ha="center", fontsize=8, rotation=90
                    )
            ax.set_xticks(range(len(items)), names, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"R = {ratio:.0%}: {label}", fontsize=9)
            low = min(vals) if vals else 0.0
            ax.set_ylim(min(0.0, low - 0.05), 1.0)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fidelity on the DINOv2 stand-in (not accuracy); hatched = tiny random LLM, mechanism only",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


def plot_allocation(summary: dict[str, Any], path: Path) -> bool:
    """Per-crop kept share q_j of every method on one photo at the smallest R, with the crops' thumbnail mass."""
    detail = _allocation_example(summary)
    if detail is None:
        return False
    n = len(detail["crop_mass"])
    methods = [m for m in METHOD_ORDER if m in detail["share"]]
    fig = _figure(max(6.0, 1.6 * n + 3), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(n)]
        bars = ax.bar(xs, detail["share"][m], width, label=m, color=COLORS[m])
        if m in LLM_SIDE:
            for b in bars:
                b.set_hatch("//")
                b.set_edgecolor("white")
    ax.axhline(detail["ratio"], color="black", lw=0.8, ls="--", label=f"R = {detail['ratio']:.0%}")
    ax.set_xticks(range(n), [f"crop {j + 1}" for j in range(n)])
    ax.set_ylabel("kept share of the crop's tokens, q_j")
    twin = ax.twinx()
    twin.plot(range(n), detail["crop_mass"], "kD", ms=7, label="thumbnail [CLS] mass M_j")
    twin.set_ylabel("thumbnail [CLS] mass of the crop's region, M_j")
    twin.set_ylim(0, max(detail["crop_mass"]) * 1.25)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=7, ncol=2, loc="upper left")
    ax.set_title(f"{detail['photo']}, R = {detail['ratio']:.0%}: tokens per crop (DINOv2 stand-in; "
                 "hatched = tiny random LLM)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_ablation(agg: list[dict], ratios: list[float], path: Path) -> bool:
    """Crop mass kept and feature cosine for allocation x scoring (logits scores) at every R."""
    rows = [a for a in agg if a["group"] == "ablation" and a["score"] == "logits"]
    allocations = list(dict.fromkeys(a["allocation"] for a in rows))
    scorings = list(dict.fromkeys(a["scoring"] for a in rows))
    if not rows:
        return False
    fig = _figure(4.2 * len(ratios), 6.5)
    axes = fig.subplots(2, len(ratios), squeeze=False)
    shades = {"holistic": "#d62728", "local": "#1f77b4", "global": "#2ca02c"}
    width = 0.8 / max(len(scorings), 1)
    for col, ratio in enumerate(ratios):
        for row, metric in enumerate(("crop_mass", "feat_cos")):
            ax = axes[row][col]
            lows = []
            for i, scoring in enumerate(scorings):
                vals = []
                for alloc in allocations:
                    hit = [
                        a
                        for a in rows
                        if a["ratio"] == ratio and a["allocation"] == alloc and a["scoring"] == scoring
                    ]
                    vals.append(hit[0][metric] if hit else float("nan"))
                lows += [v for v in vals if not math.isnan(v)]
                xs = [j + (i - (len(scorings) - 1) / 2) * width for j in range(len(allocations))]
                ax.bar(xs, vals, width, label=scoring, color=shades.get(scoring, "#777777"))
            ax.set_xticks(range(len(allocations)), allocations, fontsize=8)
            if lows:
                ax.set_ylim(max(0.0, min(lows) - 0.03), min(1.0, max(lows) + 0.02))
            ax.set_title(f"R = {ratio:.0%}: {'crop mass kept' if metric == 'crop_mass' else 'feature cos'}",
                         fontsize=9)  # fmt: skip
            ax.grid(axis="y", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(title="scoring", fontsize=7, title_fontsize=7)
    fig.suptitle("Ablations (logits scores): allocation (Table 2) x scoring (Table 3), DINOv2 stand-in; y axes zoomed",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """Write results.csv, summary.csv, summary.json, report.md and the plots; return the written paths."""
    fields = ["group", "photo", "method", "ratio", "draw", "allocation", "scoring", "score", *METRICS]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    agg = aggregate(rows)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*KEYS, "n", "photos", *METRICS])
        writer.writeheader()
        writer.writerows(agg)
    plots = []
    plot_methods(agg, summary["ratios"], out / "eval_methods.png")
    plots.append("eval_methods.png")
    if plot_allocation(summary, out / "eval_allocation.png"):
        plots.append("eval_allocation.png")
    if plot_ablation(agg, summary["ratios"], out / "eval_ablation.png"):
        plots.append("eval_ablation.png")
    (out / "summary.json").write_text(json.dumps({**summary, "aggregate": agg}, indent=2))
    (out / "report.md").write_text(markdown_report(agg, summary, plots))
    return [out / "results.csv", out / "summary.csv", out / "summary.json", out / "report.md",
            *(out / p for p in plots)]  # fmt: skip
