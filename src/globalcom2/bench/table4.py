"""Table-4-style efficiency rows (GlobalCom² Sec. 5.4): SparseVLM vs FasterVLM vs GlobalCom² (and FastV, PDrop) at
one R, on the same model and image, measured side by side in one process (`globalcom2 bench --table4`).

Per method (all through :func:`globalcom2.apply_method`, = :func:`globalcom2.methods.apply_method`; R = 10 % by
default):

- ``layer_tokens``: image tokens each LLM layer sees (``Plan.layer_tokens`` for the LLM-side methods, which keep
  the layer average at R, :mod:`globalcom2.methods.schedule`; FastV runs with ``equivalent=True`` here so that it
  is compared at the same average); ``mean_tokens`` their mean.
- ``tflops``: prefill FLOPs of the benchmarked model from those per-layer counts (:mod:`globalcom2.bench.flops`,
  vision tower + projector + every LLM layer at its own token count + LM head); ``tflops_7b``: the paper's formula
  (LLaVA-NeXT-7B, 2880 image tokens, text ignored) summed layer by layer over the method's schedule on a 32-layer
  LLM at the same R.
- ``peak_mem_mb``: weights + the peak tensor memory of one full prefill (vision + LLM, ``generate``'s
  ``logits_to_keep=1``) (:func:`globalcom2.bench.memory.peak_memory`).
- ``samples_per_s``: batched ``generate`` of ``new_tokens`` tokens, samples per second (median of the repeats).
- ``full_map_mb`` (SparseVLM): what one layer's full attention map (batch x heads x S x S, float32) takes, i.e.
  what SparseVLM's public code materialises at each of its pruning layers; this implementation computes only the
  raters' rows (its measured peak is the row above).

Every setting runs once untimed first (warm-up); timed throughput rounds then visit the settings round-robin.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..methods import apply_method
from ..methods.schedule import schedule as method_schedule
from .flops import dims_from_config, llm_layer_flops, paper_prefill_flops, prefill_flops
from .measure import PROMPT, BenchSettings, _meta, _time_ms, bench_image, build_bench_model
from .memory import peak_memory

TABLE4_METHODS = ("uncompressed", "sparsevlm", "fastervlm", "globalcom2", "fastv", "pdrop")
TABLE4_RATIO = 0.1
_OPTIONS: dict[str, dict[str, Any]] = {"fastv": {"equivalent": True}}
_SCHEDULED = {"fastv": "fastv", "pdrop": "pdrop", "sparsevlm": "sparsevlm"}


def _patched(model: Any, processor: Any, method: str, ratio: float):
    if method == "uncompressed":
        return _Nothing()
    return apply_method(model, processor, method, ratio=ratio, **_OPTIONS.get(method, {}))


class _Nothing:
    plans: list = []

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def check_table4_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` if every name is ``"uncompressed"`` or a registered method (ValueError naming the choices)."""
    from ..methods import METHODS

    unknown = [m for m in methods if m != "uncompressed" and m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from uncompressed, {', '.join(METHODS)}")
    return methods


def _adaptive(method: str) -> bool:
    """Methods whose count is set by the image, not by R (PruMerge): their rows use the measured counts."""
    from ..methods import METHODS

    return method in METHODS and not METHODS[method].uses_ratio


def _paper_tflops_7b(method: str, ratio: float) -> float | None:
    """The paper's prefill formula over a 32-layer LLaVA-NeXT-7B, layer by layer over the method's schedule
    (None for adaptive-count methods, whose 7B count cannot be derived from R)."""
    full = 2880
    if _adaptive(method):
        return None
    if method == "uncompressed":
        counts = [full] * 32
    elif method in _SCHEDULED:
        opts = {"equivalent": True} if method == "fastv" else {}
        counts = method_schedule(_SCHEDULED[method], 32, ratio, **opts).layer_counts(full)
    else:  # the vision-side methods: int(N * R) per tile (2880 = 5 tiles x 576)
        counts = [5 * int(576 * ratio)] * 32
    return sum(paper_prefill_flops(n, num_layers=1) for n in counts) / 1e12


def run_table4(settings: BenchSettings, *, methods: tuple[str, ...] = TABLE4_METHODS, ratio: float = TABLE4_RATIO,
               log: Callable[[str], None] = print, family: str = "llava_next") -> dict[str, Any]:  # fmt: skip
    """Measure every method's row on one model and image; returns ``{"meta", "rows"}`` (JSON-ready).

    ``family``: ``"llava_next"`` benchmarks the random-weight LLaVA-NeXT of ``settings.geometry``; another stand-in
    family (:data:`globalcom2.loading.FAMILIES`, every registered one) benchmarks its offline stand-in (the DINOv2
    tower; Llama 4 and the Qwen-VL classes a random tower of their own class) with a random LLM of
    ``settings.geometry``'s depth and width (:func:`table4_model`); methods the family does not run are refused
    before anything is built.
    """
    from ..methods import check_method

    for method in methods:
        if method != "uncompressed":
            check_method(method, family, ratio=ratio, num_layers=settings.geometry.llm_layers,
                         **_OPTIONS.get(method, {}))  # fmt: skip
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode():
            return _run(settings, methods, ratio, log, family)
    finally:
        torch.set_num_threads(threads)


def table4_model(settings: BenchSettings, family: str = "llava_next") -> tuple[Any, Any]:
    """The benchmarked model: the random-weight LLaVA-NeXT of ``settings.geometry``, or ``family``'s offline stand-in
    (real DINOv2 tower, random LLM of the geometry's depth and width) on ``settings.device``."""
    if family == "llava_next":
        return build_bench_model(settings)
    from ..loading import load_standin

    g = settings.geometry
    return load_standin(family=family, dtype=settings.dtype, device=settings.device, llm_hidden=g.llm_hidden,
                        llm_layers=g.llm_layers)  # fmt: skip


def _inputs(processor: Any, images: list, family: str) -> Any:
    """One prompt per image, as the family's processor takes them (Idefics3/SmolVLM: one image list per prompt)."""
    from ..workflows import default_prompt

    prompt = PROMPT if family == "llava_next" else default_prompt(processor, "Is there a dog in the image?")
    nested = [[image] for image in images] if family in ("smolvlm", "idefics3") else images
    return processor(images=nested, text=[prompt] * len(images), return_tensors="pt", padding=True)


def _run(settings: BenchSettings, methods: tuple[str, ...], ratio: float, log: Callable[[str], None],
         family: str = "llava_next") -> dict:  # fmt: skip
    from ..demo.tiny_families import standin_tower
    from ..methods.pruner import num_llm_layers

    t0 = time.perf_counter()
    device = torch.device(settings.device)
    model, processor = table4_model(settings, family)
    dtype = model.dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    num_layers = num_llm_layers(model)
    what = (
        "random-weight LLaVA-NeXT"
        if family == "llava_next"
        else f"{family} stand-in ({standin_tower(family)}, random LLM)"
    )
    log(f"built a {what} ({weights / 2**20:.0f} MiB, {num_layers} LLM layers) on {device}")
    h, w = settings.image_size
    images = [bench_image(h, w, settings.seed + i) for i in range(settings.batch)]
    # the analytic FLOPs model covers LLaVA-NeXT's tower and projector; other families: the LLM and its head
    dims = dims_from_config(model.config if family == "llava_next" else model.config.text_config)
    rows: dict[str, dict[str, Any]] = {}
    batches: dict[str, Any] = {}
    for method in methods:  # untimed pass: counts, FLOPs, peak memory
        log(f"[memory] {method}")
        with _patched(model, processor, method, ratio) as handle:
            one = _inputs(processor, images[:1], family).to(device)
            one["pixel_values"] = one["pixel_values"].to(dtype)
            _, peak = peak_memory(lambda: model(**one, logits_to_keep=1), device)  # noqa: B023 - called now
            plan = handle.plans[0] if handle.plans else None
            batch = _inputs(processor, images, family)
            batches[method] = batch.to(device)  # built by this method's processor (its placeholder count)
            batches[method]["pixel_values"] = batches[method]["pixel_values"].to(dtype)
        ids = one["input_ids"][0]
        n_vis = int((ids == model.config.image_token_id).sum())
        n_txt = int(ids.shape[0]) - n_vis
        if plan is not None and plan.layer_tokens is not None:
            layer_tokens = list(plan.layer_tokens)
        elif _adaptive(method):  # placeholders resized inside forward: the plans hold what the LLM gets
            layer_tokens = [plan.num_tokens if plan is not None else n_vis] * num_layers
        else:
            layer_tokens = [n_vis] * num_layers  # pre-LLM methods: the placeholders are already the kept ones
        tiles = int(one["pixel_values"].shape[1]) if family == "llava_next" else 0
        base = prefill_flops(dims, num_visual_tokens=0, num_text_tokens=0, num_tiles=tiles)
        llm = sum(llm_layer_flops(dims.text, n + n_txt) for n in layer_tokens)
        seq = n_vis + n_txt
        heads = model.config.text_config.num_attention_heads
        rows[method] = {
            "method": method, "ratio": 1.0 if method == "uncompressed" else ratio,
            "visual_tokens_in": n_vis, "layer_tokens": layer_tokens,
            "mean_tokens": sum(layer_tokens) / num_layers,
            "tflops": (base.vision + base.projector + llm + base.lm_head) / 1e12,
            "tflops_7b": _paper_tflops_7b(method, ratio),
            "peak_mem_mb": (weights + peak) / 2**20, "prefill_peak_mb": peak / 2**20,
            "full_map_mb": heads * seq * seq * 4 / 2**20 if method == "sparsevlm" else None,
            "generate_ms_runs": [],
        }  # fmt: skip
    if settings.throughput:
        for method in methods:  # warm-up
            with _patched(model, processor, method, ratio):
                _generate(model, batches[method], settings)
        for rep in range(settings.throughput_repeats):
            log(f"[throughput] round {rep + 1}/{settings.throughput_repeats}")
            for method in methods:
                with _patched(model, processor, method, ratio):
                    ms = _time_ms(lambda: _generate(model, batches[method], settings), device)[1]  # noqa: B023
                rows[method]["generate_ms_runs"].append(ms)
    out = []
    base_row = rows.get("uncompressed")
    for method in methods:
        row = rows[method]
        runs = row["generate_ms_runs"]
        row["samples_per_s"] = settings.batch / (statistics.median(runs) / 1e3) if runs else None
        if base_row is not None:
            row["tflops_ratio"] = row["tflops"] / base_row["tflops"]
            row["peak_mem_ratio"] = row["peak_mem_mb"] / base_row["peak_mem_mb"]
            if runs and base_row["generate_ms_runs"]:
                row["speedup"] = row["samples_per_s"] / base_row["samples_per_s"]
        out.append(row)
    meta = _meta(replace(settings, ratios=(ratio,)), model, weights)
    meta["seconds"] = time.perf_counter() - t0
    meta["llm_layers"] = num_layers
    meta["family"] = family
    meta["tflops_scope"] = "vision + projector + LLM + head" if family == "llava_next" else "LLM + head"
    return {"meta": meta, "rows": out}


def _generate(model: Any, inputs: Any, settings: BenchSettings) -> Any:
    return model.generate(**inputs, max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                          do_sample=False)  # fmt: skip


def format_table4(result: dict[str, Any]) -> str:
    """The rows as a text table, Table 4's columns first."""
    meta = result["meta"]
    lines = [
        f"Table-4-style rows at R = {result['rows'][-1]['ratio']:.0%} on {meta['device']} "
        f"({meta.get('family', 'llava_next')}, TFLOPs of {meta.get('tflops_scope', 'the whole model')}; "
        f"{meta['llm_layers']} LLM layers, image {'x'.join(map(str, meta['settings']['image_size']))}, "
        f"batch {meta['settings']['batch']})",
        f"{'method':<14}{'mean tok':>9}{'TFLOPs':>10}{'7B TFLOPs':>10}{'peak MB':>10}{'samples/s':>11}"
        f"{'speed-up':>9}  notes",
    ]
    for r in result["rows"]:
        sps = f"{r['samples_per_s']:.2f}" if r.get("samples_per_s") else "-"
        tflops_7b = f"{r['tflops_7b']:.2f}" if r["tflops_7b"] is not None else "-"
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        note = (
            f"full attention map would take {r['full_map_mb']:.1f} MB per layer"
            if r.get("full_map_mb")
            else ""
        )
        lines.append(
            f"{r['method']:<14}{r['mean_tokens']:>9.1f}{r['tflops']:>10.4f}{tflops_7b:>10}"
            f"{r['peak_mem_mb']:>10.1f}{sps:>11}{speed:>9}  {note}"
        )
    return "\n".join(lines)


__all__ = ["TABLE4_METHODS", "TABLE4_RATIO", "check_table4_methods", "format_table4", "run_table4"]
