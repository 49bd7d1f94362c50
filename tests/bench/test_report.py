"""Bench report: targets stated for real sizes are not judged at --tiny sizes."""

from __future__ import annotations

from dataclasses import asdict, replace

from globalcom2.bench.measure import REAL, TINY
from globalcom2.bench.report import format_measured, markdown_report, target_verdict, targets_na_reason


def _result(geometry) -> dict:
    """A minimal measured result (two settings) with three unmet targets and one met."""
    rec = {"setting": "uncompressed", "visual_tokens": 10, "tflops": 1.0, "tflops_7b": 1.0, "kv_cache_mb": 1.0,
           "vision_ms": 1.0, "vision_ms_min": 1.0, "vision_ms_max": 1.0, "selection_ms": 0.0, "selection_share": 0.0,
           "prefill_ms": 1.0, "prefill_ms_min": 1.0, "prefill_ms_max": 1.0, "prefill_cpu_ms": 1.0,
           "prefill_speedup": 1.0, "prefill_speedup_cpu_time": 1.0, "flops_ratio_llm": 1.0, "peak_mem_mb": 1.0,
           "scoring_ms": 0.1, "pack_ms": 0.1}  # fmt: skip
    targets = [{"target": f"target {i}", "value": 0.5, "threshold": 1.0, "met": i == 3} for i in range(4)]
    settings = {"dtype": "float32", "geometry": asdict(geometry), "image_size": [128, 128], "repeats": 2}
    return {
        "meta": {"device": "CPU", "torch": "x", "transformers": "y", "date": "today", "settings": settings},
        "records": [rec, {**rec, "setting": "R=0.1"}],
        "overhead": {
            "plain_sdpa_encode_peak_mb": 1.0,
            "globalcom2_encode_peak_mb": {"R=0.1": 1.0},
            "eager_output_attentions_encode_peak_mb": 2.0,
            "eager_output_attentions_encode_ms": 3.0,
            "hf_pack_ms": 0.1,
        },
        "throughput": [],
        "targets": targets,
    }


def test_tiny_targets_read_not_applicable() -> None:
    tiny = _result(TINY)
    assert targets_na_reason(tiny) == "n/a at --tiny sizes"
    # --tiny with other depths is still tiny: the widths decide
    assert targets_na_reason(_result(replace(TINY, vision_layers=5, llm_layers=1))) == "n/a at --tiny sizes"
    text, md = format_measured(tiny), markdown_report(tiny)
    assert "NOT met" not in text and "[met]" not in text and text.count("[n/a at --tiny sizes]") == 4
    assert "not met" not in md.lower() and md.count("**n/a at --tiny sizes**") == 4
    assert "0.500 (threshold 1.0)" in text  # the measured values are still shown


def test_real_size_targets_are_judged() -> None:
    for geometry in (REAL, replace(REAL, vision_layers=4, llm_layers=1)):  # depth does not change the verdict
        real = _result(geometry)
        assert targets_na_reason(real) is None
        assert [target_verdict(real, t) for t in real["targets"]] == ["NOT met"] * 3 + ["met"]
        text = format_measured(real)
        assert text.count("[NOT met]") == 3 and text.count("[met]") == 1
    odd = _result(replace(REAL, llm_hidden=512))
    assert targets_na_reason(odd) == "n/a at these sizes"
