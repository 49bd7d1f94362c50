"""Terminal tables and the Markdown summary of a benchmark result (paper Table 4's quantities)."""

from __future__ import annotations

from typing import Any

from .flops import config_table, llava_next_7b_config, paper_table

PAPER_FORMULA = "L*(8*n*d^2 + 4*n^2*d + 6*n*d*m), L=32, d=4096, m=11008"


def analytic(
    *, image_size: tuple[int, int] = (672, 672), text_tokens: int = 64, ratios=(1.0, 0.5, 0.25, 0.1)
) -> dict[str, Any]:
    """The analytic part of the benchmark for LLaVA-NeXT-7B: paper formula and config-derived breakdown."""
    return {
        "model": "LLaVA-NeXT-7B geometry (llava-v1.6-vicuna-7b: CLIP ViT-L/14-336 + 32 x 4096 Llama)",
        "paper_formula": PAPER_FORMULA,
        "paper": paper_table(ratios),
        "config": config_table(
            llava_next_7b_config(), image_size=image_size, num_text_tokens=text_tokens, ratios=ratios
        ),
        "image_size": list(image_size),
        "text_tokens": text_tokens,
    }


#: Geometry fields the targets' sizes are stated for (CLIP ViT-L/14-336 tiles, a 4096-wide LLM); depths may vary.
_SIZE_FIELDS = ("tile", "patch", "vision_hidden", "vision_intermediate", "llm_hidden", "llm_intermediate")


def targets_na_reason(result: dict[str, Any]) -> str | None:
    """Why the targets do not apply to ``result``, or None when they do.

    The targets (selection share of the encode, scoring memory, prefill speed-up vs the FLOPs ratio) are stated for
    real widths: CLIP ViT-L/14-336 tiles and a 4096-wide LLM. At ``--tiny`` sizes (a 32-wide tower, a 64-wide LLM)
    fixed per-call costs dominate every ratio, so "met" or "NOT met" would say nothing.
    """
    from dataclasses import asdict

    from .measure import REAL, TINY

    geometry = result.get("meta", {}).get("settings", {}).get("geometry", {})
    sizes = {k: geometry.get(k) for k in _SIZE_FIELDS}
    if sizes == {k: asdict(REAL)[k] for k in _SIZE_FIELDS}:
        return None
    if sizes == {k: asdict(TINY)[k] for k in _SIZE_FIELDS}:
        return "n/a at --tiny sizes"
    return "n/a at these sizes"


def target_verdict(result: dict[str, Any], target: dict[str, Any]) -> str:
    """``"met"``, ``"NOT met"`` or, where the targets do not apply (:func:`targets_na_reason`), why not."""
    return targets_na_reason(result) or ("met" if target["met"] else "NOT met")


def _pct(r: float) -> str:
    return f"{r:.0%}"


def format_analytic(a: dict[str, Any]) -> str:
    h, w = a["image_size"]
    lines = [f"Analytic prefill cost, {a['model']}", f"  paper formula (docs/design.md §7): {a['paper_formula']}, n = 2880*R "
             "visual tokens, text ignored; KV cache fp16"]  # fmt: skip
    lines.append(f"  {'R':>6}{'visual tokens':>15}{'TFLOPs':>10}{'KV cache MiB':>15}")
    for r in a["paper"]:
        lines.append(
            f"  {_pct(r['ratio']):>6}{r['visual_tokens']:>15}{r['tflops']:>10.2f}{r['kv_cache_mb']:>15.1f}"
        )
    c0 = a["config"][0]
    lines += [
        "",
        f"  derived from the HF config: {h}x{w} image -> {c0['num_tiles']} tiles, budget-mode visual tokens, "
        f"{a['text_tokens']} text tokens; FLOPs = 2 x MACs, full n^2 attention",
        f"  {'R':>6}{'visual':>8}{'vision+proj':>13}{'LLM':>8}{'LM head':>9}{'total':>8}{'LLM ratio':>11}"
        f"{'paper terms':>13}{'KV MiB':>9}",
    ]
    llm0 = c0["tflops_llm"] + c0["tflops_lm_head"]
    for r in a["config"]:
        llm = r["tflops_llm"] + r["tflops_lm_head"]
        lines.append(
            f"  {_pct(r['ratio']):>6}{r['visual_tokens']:>8}{r['tflops_vision'] + r['tflops_projector']:>13.2f}"
            f"{r['tflops_llm']:>8.2f}{r['tflops_lm_head']:>9.4f}{r['tflops_total']:>8.2f}{llm0 / llm:>10.2f}x"
            f"{r['tflops_paper_terms']:>13.2f}{r['kv_cache_mb']:>9.1f}"
        )
    lines.append(
        "  (paper terms = the config formula restricted to the paper's: LLM layers, visual tokens only)"
    )
    return "\n".join(lines)


def _spread(rec: dict[str, Any], key: str) -> str:
    return f"{rec[key]:.1f} [{rec[key + '_min']:.1f}-{rec[key + '_max']:.1f}]"


def format_measured(result: dict[str, Any]) -> str:
    m = result["meta"]
    s = m["settings"]
    g = s["geometry"]
    lines = [
        f"Measured on {m['device']} ({s['dtype']}; torch {m['torch']}, transformers {m['transformers']})",
        f"  random weights: CLIP tower {g['vision_hidden']} wide x {g['vision_layers']} layers "
        f"(tile {g['tile']}, patch {g['patch']}), LLM {g['llm_hidden']} wide x {g['llm_layers']} layer(s); "
        f"image {s['image_size'][0]}x{s['image_size'][1]}; wall-clock median [min-max] of {s['repeats']} runs; "
        f"load average {m.get('load_average_start')} -> {m.get('load_average_end')}",
        f"  {'setting':<13}{'vis tok':>8}{'TFLOPs':>9}{'KV MiB':>8}{'vision ms':>24}{'select ms':>10}{'share':>7}"
        f"{'prefill ms':>26}{'speed-up':>9}{'(CPU t)':>9}{'FLOPs':>7}{'peak MiB':>10}",
    ]  # fmt: skip
    for r in result["records"]:
        lines.append(
            f"  {r['setting']:<13}{r['visual_tokens']:>8}{r['tflops']:>9.3g}{r['kv_cache_mb']:>8.1f}"
            f"{_spread(r, 'vision_ms'):>24}{r['selection_ms']:>10.1f}{r['selection_share']:>7.1%}"
            f"{_spread(r, 'prefill_ms'):>26}{r['prefill_speedup']:>8.2f}x{r['prefill_speedup_cpu_time']:>8.2f}x"
            f"{r['flops_ratio_llm']:>6.2f}x"
            f"{r['peak_mem_mb']:>10.1f}"
        )
    o = result["overhead"]
    lines += [
        "  (share = selection / uncompressed vision time; speed-up from wall-clock medians, (CPU t) from process CPU"
        " time; FLOPs = analytic LLM prefill FLOPs ratio; peak = weights + largest activation peak)",
        "",
        "Overhead of scoring (same inputs, get_image_features)",
        f"  peak memory: plain SDPA encode {o['plain_sdpa_encode_peak_mb']:.1f} MiB; with GlobalCom² "
        + ", ".join(f"{k} {v:.1f}" for k, v in o["globalcom2_encode_peak_mb"].items())
        + f" MiB; eager + output_attentions (official approach) {o['eager_output_attentions_encode_peak_mb']:.1f} MiB",
        "  selection time per R (scoring hook + pack): "
        + ", ".join(
            f"{r['setting']} {r['scoring_ms']:.1f} + {r['pack_ms']:.1f} ms" for r in result["records"][1:]
        )
        + f"; HF's own pack on the uncompressed call: {o['hf_pack_ms']:.1f} ms (GlobalCom²'s pack replaces it)",
        f"  official-style encode (eager + output_attentions), one run: {o['eager_output_attentions_encode_ms']:.0f} ms",
    ]
    if result["throughput"]:
        lines += ["", "Throughput: batched generate of a short answer"]
        for t in result["throughput"]:
            extra = f" ({t['speedup']:.2f}x)" if "speedup" in t else ""
            lines.append(
                f"  {t['setting']:<13} batch {t['batch']}, {t['new_tokens']} new tokens: "
                f"{t['generate_ms']:.0f} ms [{t['generate_ms_min']:.0f}-{t['generate_ms_max']:.0f}] -> "
                f"{t['samples_per_s']:.3f} samples/s{extra}"
            )
    if result.get("targets"):
        na = targets_na_reason(result)
        lines += [
            "",
            "Targets" + (f" ({na}: they are stated for CLIP-L/336 tiles and a 4096-wide LLM)" if na else ""),
        ]
        for t in result["targets"]:
            lines.append(f"  [{target_verdict(result, t)}] {t['target']}: {t['value']:.3f} "
                         f"(threshold {t['threshold']})")  # fmt: skip
    return "\n".join(lines)


def markdown_report(result: dict[str, Any], *, command: str = "", plot: str = "") -> str:
    """A short Markdown page for ``benchmarks/``: settings, the measured table, overhead, throughput, targets."""
    m = result["meta"]
    s = m["settings"]
    g = s["geometry"]
    md = [
        f"# GlobalCom² efficiency benchmark — {m['device']}",
        "",
        f"Recorded {m['date']} with torch {m['torch']}, transformers {m['transformers']}, {s['dtype']}.",
        "",
    ]
    if command:
        md += ["```bash", command, "```", ""]
    md += [
        f"Stock `LlavaNextForConditionalGeneration` with **random weights**: CLIP tower "
        f"{g['vision_hidden']} wide x {g['vision_layers']} layers (tile {g['tile']}, patch {g['patch']}), "
        f"LLM {g['llm_hidden']} wide (MLP {g['llm_intermediate']}, {g['llm_heads']} heads) x {g['llm_layers']} "
        f"layer(s). One {s['image_size'][0]}x{s['image_size'][1]} image; compression through `globalcom2.apply` "
        f"(budget mode). Times: wall-clock median [min-max] of {s['repeats']} runs, settings interleaved; "
        f"load average (1/5/15 min) {m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end.",
        "",
        "| setting | visual tokens | TFLOPs (this model) | TFLOPs (7B) | KV cache MiB | vision ms | selection ms "
        "(share) | LLM prefill ms | prefill CPU-time ms | prefill speed-up (wall / CPU time) | LLM FLOPs ratio | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        md.append(
            f"| {r['setting']} | {r['visual_tokens']} | {r['tflops']:.3g} | {r['tflops_7b']:.2f} | "
            f"{r['kv_cache_mb']:.1f} | {_spread(r, 'vision_ms')} | {r['selection_ms']:.1f} ({r['selection_share']:.2%}) | "
            f"{_spread(r, 'prefill_ms')} | {r['prefill_cpu_ms']:.0f} | {r['prefill_speedup']:.2f}x / "
            f"{r['prefill_speedup_cpu_time']:.2f}x | {r['flops_ratio_llm']:.2f}x | "
            f"{r['peak_mem_mb']:.0f} |"
        )
    o = result["overhead"]
    md += [
        "",
        "Encode peak memory (activations above the weights, same inputs): plain SDPA "
        f"{o['plain_sdpa_encode_peak_mb']:.1f} MiB; with GlobalCom² "
        + ", ".join(f"{k} {v:.1f}" for k, v in o["globalcom2_encode_peak_mb"].items())
        + f" MiB; eager attention + `output_attentions` (official approach) "
        f"{o['eager_output_attentions_encode_peak_mb']:.1f} MiB.",
        "",
    ]
    if result["throughput"]:
        md += ["| throughput | batch | new tokens | generate ms | samples/s |", "|---|---|---|---|---|"]
        for t in result["throughput"]:
            md.append(
                f"| {t['setting']} | {t['batch']} | {t['new_tokens']} | {t['generate_ms']:.0f} "
                f"[{t['generate_ms_min']:.0f}-{t['generate_ms_max']:.0f}] | {t['samples_per_s']:.3f} |"
            )
        md.append("")
    if result.get("targets"):
        na = targets_na_reason(result)
        md += [f"Targets (reported, not asserted{f'; {na}' if na else ''}):", ""]
        for t in result["targets"]:
            md.append(f"- **{target_verdict(result, t)}** — {t['target']}: {t['value']:.3f} "
                      f"(threshold {t['threshold']})")  # fmt: skip
        md.append("")
    if plot:
        md += [f"![time and memory vs R]({plot})", ""]
    return "\n".join(md)
