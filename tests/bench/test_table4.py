"""`globalcom2 bench --table4`: Table-4-style rows measured side by side on one tiny model and image."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from globalcom2.bench.measure import BenchSettings
from globalcom2.bench.table4 import format_table4, run_table4
from globalcom2.methods.schedule import schedule


def test_rows_follow_the_schedules():
    settings = BenchSettings.tiny(throughput=False)
    settings = settings.__class__(**{**settings.__dict__, "geometry": settings.geometry.__class__(
        **{**settings.geometry.__dict__, "llm_layers": 32})})  # fmt: skip
    result = run_table4(settings, methods=("uncompressed", "sparsevlm", "fastervlm", "globalcom2", "prumerge"),
                        ratio=0.1, log=lambda msg: None)  # fmt: skip
    rows = {r["method"]: r for r in result["rows"]}
    full = rows["uncompressed"]
    n = full["visual_tokens_in"]
    assert full["layer_tokens"] == [n] * 32 and full["tflops_7b"] == pytest.approx(41.65, abs=0.01)
    sv = rows["sparsevlm"]
    assert sv["visual_tokens_in"] == n  # SparseVLM prunes inside the LLM: every placeholder reaches it
    assert sv["layer_tokens"] == schedule("sparsevlm", 32, 0.1).layer_counts(n)
    assert n * 0.1 - 1 < sv["mean_tokens"] <= n * 0.1
    assert sv["full_map_mb"] > 0 and rows["globalcom2"]["full_map_mb"] is None
    for method in ("fastervlm", "globalcom2"):  # pre-LLM: fewer placeholders, the same count in every layer
        r = rows[method]
        assert r["visual_tokens_in"] < n and len(set(r["layer_tokens"])) == 1
        assert r["tflops"] < full["tflops"] and r["peak_mem_mb"] < full["peak_mem_mb"]
    assert sv["tflops"] < full["tflops"] and sv["peak_mem_mb"] < full["peak_mem_mb"]
    pm = rows[
        "prumerge"
    ]  # adaptive count: full placeholders, resized inside forward; its plans give the count
    assert pm["visual_tokens_in"] == n and len(set(pm["layer_tokens"])) == 1 and pm["mean_tokens"] < n
    assert pm["tflops_7b"] is None and pm["tflops"] < full["tflops"]
    assert "sparsevlm" in format_table4(result) and "prumerge" in format_table4(result)


def test_cli_table4_json(tmp_path):
    out = tmp_path / "t4.json"
    res = subprocess.run(
        [sys.executable, "-m", "globalcom2", "bench", "--tiny", "--table4", "--no-throughput", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["uncompressed", "sparsevlm", "fastervlm", "globalcom2", "fastv",
                                                    "pdrop"]  # fmt: skip
    assert data["meta"]["llm_layers"] == 32 and "--table4" in data["meta"]["command"]
    assert "Table-4-style rows at R = 10%" in res.stdout


def test_cli_table4_unknown_method_is_one_line():
    res = subprocess.run(
        [sys.executable, "-m", "globalcom2", "bench", "--tiny", "--table4", "--methods", "sparsevlm,nope"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and res.stdout == ""
    assert "--methods: unknown method(s) ['nope']; choose from uncompressed, globalcom2" in res.stderr
