"""Outputs of `globalcom2 eval --task defects`: CSV, JSON, a Markdown report and the AUROC / detection figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .report import COLORS, METHOD_ORDER, _figure

#: The method name of the rows without compression.
UNCOMPRESSED = "uncompressed"

PANELS = (("auroc", "AUROC"), ("detection", "detection rate"))


def _methods(summary: list[dict[str, Any]]) -> list[str]:
    present = {s["method"] for s in summary} - {UNCOMPRESSED}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _cell(s: dict[str, Any], metric: str) -> str:
    return f"{s[metric]:.3f} [{s[metric + '_lo']:.2f}, {s[metric + '_hi']:.2f}]"


def _find(summary: list[dict[str, Any]], kind: str, method: str, ratio: float) -> dict[str, Any] | None:
    for s in summary:
        if s["kind"] == kind and s["method"] == method and s["ratio"] == ratio:
            return s
    return None


def markdown_tables(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Per defect kind: AUROC, detection rate and localisation per method x R, then GlobalCom²'s allocation."""
    ratios = meta["ratios"]
    far = meta["far"]
    lines: list[str] = []
    for kind, statistic in meta["kinds"].items():
        base = _find(summary, kind, UNCOMPRESSED, 1.0)
        if base is None:
            continue
        lines += [
            f"**{kind} defects** ({base['num_defect']} defect vs {base['num_nominal']} nominal test mosaics; image "
            f"score = {statistic} over kept tokens). Uncompressed: AUROC {_cell(base, 'auroc')}, detection at "
            f"{far:.0%} false alarms {_cell(base, 'detection')}, defect tile flagged {base['localised']:.0%}.",
            "",
            "| method | " + " | ".join(f"R = {r:.0%}" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for metric, label in (*PANELS, ("localised", "defect tile flagged")):
            for method in _methods(summary):
                cells = []
                for ratio in ratios:
                    s = _find(summary, kind, method, ratio)
                    cells.append("—" if s is None else (f"{s[metric]:.0%}" if metric == "localised"
                                                       else _cell(s, metric)))  # fmt: skip
                lines.append(f"| {method}: {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**GlobalCom²'s allocation of the defect tile** (the crops' r_j of paper Eq. 4, weighted by their overlap "
        "with the defect image, compared with R):",
        "",
        "| defect | R | tile budget above R | below R | mean r_tile / R |",
        "|---|---|---|---|---|",
    ]
    for kind in meta["kinds"]:
        for ratio in ratios:
            s = _find(summary, kind, "globalcom2", ratio)
            if s is not None and "defect_tile_up" in s:
                lines.append(f"| {kind} | {ratio:.0%} | {s['defect_tile_up']:.0%} | {s['defect_tile_down']:.0%} | "
                             f"{s['defect_tile_ratio']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown_report(summary: list[dict[str, Any]], meta: dict[str, Any], figure: str | None) -> str:
    head = [
        "# Defect benchmark: does compression keep a small defect?",
        "",
        f"> {meta['note']}",
        "",
        f"Command: `{meta['command']}`. Wall time {meta['seconds']:.0f} s, CPU time {meta['cpu_seconds']:.0f} s "
        f"({meta['machine']['threads']} torch threads, {meta['machine']['cpus']} CPUs, load average at start / end "
        f"{meta['machine']['load_average_start_end']}, {meta['machine']['platform']}). {meta['num_train']} nominal training mosaics (bank tokens: "
        f"{meta['bank_tokens']}), {meta['num_test_per_class']} test mosaics per class, layouts "
        f"{', '.join('x'.join(map(str, x)) for x in meta['layouts'])} (rows x cols of 250 px textile images), "
        f"{meta['num_boot']} bootstrap resamples (95 % intervals), seed {meta['seed']}, score fingerprint "
        f"`{meta['fingerprint']}`.",
        "",
    ]
    if figure:
        head += [f"![AUROC and detection rate vs R]({figure})", ""]
    return "\n".join(head) + "\n" + markdown_tables(summary, meta)


def plot_defects(summary: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """AUROC and detection rate vs R per method (95 % bootstrap intervals), one row per defect kind."""
    kinds = [k for k in meta["kinds"] if _find(summary, k, UNCOMPRESSED, 1.0) is not None]
    ratios = sorted(meta["ratios"])
    fig = _figure(10.0, 3.6 * len(kinds))
    axes = fig.subplots(len(kinds), len(PANELS), squeeze=False)
    methods = _methods(summary)
    for row, kind in enumerate(kinds):
        base = _find(summary, kind, UNCOMPRESSED, 1.0)
        assert base is not None
        for col, (metric, label) in enumerate(PANELS):
            ax = axes[row][col]
            ax.axhspan(base[metric + "_lo"], base[metric + "_hi"], color="black", alpha=0.08)
            ax.axhline(base[metric], color="black", ls="--", lw=1, label="uncompressed")
            for k, method in enumerate(methods):
                found = [(r, _find(summary, kind, method, r)) for r in ratios]
                pts = [(r, s) for r, s in found if s is not None]
                xs = [100 * r * (1 + 0.03 * (k - len(methods) / 2)) for r, _ in pts]  # dodge the error bars
                ys = [s[metric] for _, s in pts]
                err = [
                    [s[metric] - s[metric + "_lo"] for _, s in pts],
                    [s[metric + "_hi"] - s[metric] for _, s in pts],
                ]
                legend = method + (" (adaptive, R unused)" if method.startswith("prumerge") else "")
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, lw=1.2, capsize=2, label=legend,
                            color=COLORS.get(method))  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks([100 * r for r in ratios], [f"{100 * r:g}" for r in ratios])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("R (% of visual tokens kept)")
            ax.set_title(f"{kind} defects: {label}" + (f" at {meta['far']:.0%} false alarms"
                                                        if metric == "detection" else ""), fontsize=9)  # fmt: skip
            ax.set_ylim(0.0 if metric == "detection" else 0.3, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Defects in textile mosaics: nearest-neighbour detector on the DINOv2 stand-in's kept tokens "
                 "(not an LVLM's answer)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_defects(
    out: Path,
    rows: list[dict[str, Any]],
    allocation: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    meta: dict[str, Any],
) -> list[Path]:
    """Write ``results.csv`` (per mosaic x method x R), ``allocation.csv``, ``summary.csv``, ``summary.json``,
    ``report.md`` and ``defects.png``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.csv", out / "allocation.csv", out / "summary.csv", out / "summary.json"]
    _write_csv(files[0], rows)
    _write_csv(files[1], allocation)
    _write_csv(files[2], summary)
    files[3].write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    figure = out / "defects.png"
    plot_defects(summary, meta, figure)
    report = out / "report.md"
    report.write_text(markdown_report(summary, meta, figure.name))
    return [*files, report, figure]
