"""Plot of a benchmark result: time, memory and prefill speed-up against the retention ratio R (Table 4 visually).

matplotlib is imported lazily (Agg canvas, no pyplot), like :mod:`globalcom2.viz.overlay`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(result: dict[str, Any], path: str | Path) -> Path:
    """Write a three-panel PNG: times (median, min-max bars), peak memory, measured vs analytic speed-up."""
    from ..extras import optional_imports

    with optional_imports("--plot"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    recs = result["records"]
    x = list(range(len(recs)))
    labels = ["full" if not r["compressed"] else f"R={r['ratio']:.0%}" for r in recs]
    fig = Figure(figsize=(15, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_m, ax_s = fig.subplots(1, 3)

    for key, name, color in (("vision_ms", "vision encode", "tab:blue"), ("selection_ms", "selection", "tab:orange"),
                             ("prefill_ms", "LLM prefill", "tab:green")):  # fmt: skip
        pts = [(i, r) for i, r in zip(x, recs, strict=True) if r[key] > 0]  # no selection when uncompressed
        med = [r[key] for _, r in pts]
        lo = [r[key] - r[key + "_min"] for _, r in pts]
        hi = [r[key + "_max"] - r[key] for _, r in pts]
        ax_t.errorbar([i for i, _ in pts], med, yerr=[lo, hi], marker="o", capsize=3, label=name, color=color)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms (median, min-max)")
    ax_t.set_title("time per image")

    width = 0.27
    for i, (key, name) in enumerate((("vision_peak_mb", "encode peak"), ("prefill_peak_mb", "prefill peak"),
                                     ("kv_cache_mb", "KV cache"))):  # fmt: skip
        ax_m.bar([v + (i - 1) * width for v in x], [r[key] for r in recs], width, label=name)
    eager = result["overhead"]["eager_output_attentions_encode_peak_mb"]
    ax_m.axhline(eager, color="tab:red", ls="--", lw=1, label="encode, eager + output_attentions")
    ax_m.set_ylabel("MiB above the weights")
    ax_m.set_title("peak memory")

    ax_s.plot(x, [r["flops_ratio_llm"] for r in recs], marker="s", label="analytic LLM FLOPs ratio")
    ax_s.plot(
        x, [r["prefill_speedup"] for r in recs], marker="o", label="measured prefill speed-up (medians)"
    )
    ax_s.plot(
        x, [r["prefill_speedup_best"] for r in recs], marker=".", ls=":", label="measured (fastest runs)"
    )
    if result["meta"]["settings"]["device"] == "cpu" and "prefill_speedup_cpu_time" in recs[0]:
        ax_s.plot(x, [r["prefill_speedup_cpu_time"] for r in recs], marker="^", ls="--",
                  label="measured (process CPU time)")  # fmt: skip
    ax_s.set_ylabel("x vs uncompressed")
    ax_s.set_title("prefill speed-up")

    for ax in (ax_t, ax_m, ax_s):
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = result["meta"]
    g = meta["settings"]["geometry"]
    fig.suptitle(
        f"GlobalCom² efficiency on {meta['device']} — random weights, CLIP {g['vision_hidden']}x{g['vision_layers']}L, "
        f"LLM {g['llm_hidden']}x{g['llm_layers']}L, {meta['settings']['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
