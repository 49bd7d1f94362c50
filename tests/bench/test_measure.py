"""Measurement plumbing: the CPU peak-memory probe, the selection timer, and `globalcom2 bench` end to end
(a real subprocess on a tiny random LLaVA-NeXT, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from globalcom2.bench.memory import peak_memory
from tests.conftest import PROMPT, random_image


def test_cpu_peak_memory_sees_the_high_water_mark():
    keep = torch.ones(4_000_000)  # allocated before: not counted

    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 8 MB live
        c = torch.cat([a, b])  # 16 MB live: the peak
        del a, b
        return c.sum()

    _, peak = peak_memory(work, "cpu")
    assert 16_000_000 <= peak < 16_100_000
    _, none = peak_memory(lambda: keep.sum(), "cpu")
    assert none < 1_000


def test_selection_timer_brackets_the_hook_and_restores(tiny):
    import globalcom2
    from globalcom2.bench.measure import SelectionTimer

    model, processor = tiny
    inner = model.model
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        patched_pack = inner.__dict__["pack_image_features"]
        inputs = processor(images=[random_image(100, 160)], text=[PROMPT], return_tensors="pt")
        with torch.inference_mode(), SelectionTimer(model, handle, torch.device("cpu")) as timer:
            inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        assert timer.scoring_ms > 0 and timer.pack_ms > 0
        assert inner.__dict__["pack_image_features"] is patched_pack
    assert "pack_image_features" not in inner.__dict__
    with SelectionTimer(model, None, torch.device("cpu")) as timer:  # uncompressed: HF's pack is timed
        with torch.inference_mode():
            inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert timer.scoring_ms == 0 and timer.pack_ms > 0
    assert "pack_image_features" not in inner.__dict__


def _bench_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "globalcom2.cli", "bench", *args], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_bench_tiny_end_to_end(tmp_path):
    from globalcom2.adapters.anyres import anyres_geometry

    out = tmp_path / "res"
    res = _bench_cli("--tiny", "--ratios", "0.5,0.1", "--json", str(out / "b.json"), "--plot", str(out / "b.png"),
                     "--md", str(out / "b.md"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "41.65" in res.stdout and "Targets" in res.stdout
    # the targets are stated for real sizes: at --tiny sizes they are reported as not applicable
    assert "NOT met" not in res.stdout and res.stdout.count("[n/a at --tiny sizes]") == 4
    data = json.loads((out / "b.json").read_text())
    recs = data["records"]
    assert [r["setting"] for r in recs] == ["uncompressed", "R=0.5", "R=0.1"]
    pins = [[64 * a, 64 * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    geo = anyres_geometry((128, 128), pins, 64, 8)
    for r in recs:
        for key in ("ratio", "visual_tokens", "tflops", "kv_cache_mb", "vision_ms", "selection_ms", "prefill_ms",
                    "peak_mem_mb", "vision_ms_min", "vision_ms_max", "prefill_ms_runs"):  # fmt: skip
            assert key in r, key
        assert r["visual_tokens"] == geo.num_tokens(r["ratio"])  # placeholders the processor emitted
        assert r["kv_cache_mb"] == pytest.approx(r["kv_cache_mb_analytic"])
        assert (
            len(r["prefill_ms_runs"]) == 2 and r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
        )
    assert recs[0]["selection_ms"] == 0 and all(r["selection_ms"] > 0 for r in recs[1:])
    assert recs[0]["tflops"] > recs[1]["tflops"] > recs[2]["tflops"]
    assert recs[0]["kv_cache_mb"] > recs[1]["kv_cache_mb"] > recs[2]["kv_cache_mb"]
    # Eager attention with every map stored needs more memory than the SDPA encode, with or without scoring.
    o = data["overhead"]
    assert o["eager_output_attentions_encode_peak_mb"] > o["plain_sdpa_encode_peak_mb"] > 0
    assert [t["batch"] for t in data["throughput"]] == [4, 4] and data["throughput"][1]["samples_per_s"] > 0
    # three targets; on CPU the prefill one is judged on wall-clock and on process-CPU-time medians
    assert len(data["targets"]) == 4 and all(isinstance(t["met"], bool) for t in data["targets"])
    assert data["analytic"]["paper"][0]["visual_tokens"] == 2880
    with Image.open(out / "b.png") as im:
        assert im.format == "PNG" and im.width > 800
    md = (out / "b.md").read_text()
    assert "| R=0.1 |" in md and "b.png" in md and "globalcom2 bench --tiny" in md
    # A saved result re-renders without rerunning anything.
    again = _bench_cli("--from-json", str(out / "b.json"), "--md", str(out / "again.md"))
    assert again.returncode == 0, again.stderr
    table = [line for line in md.splitlines() if line.startswith("| R=")]
    assert table and table == [
        line for line in (out / "again.md").read_text().splitlines() if line.startswith("| R=")
    ]


def test_bench_refuses_reference_mode():
    res = _bench_cli("--tiny", "--mode", "reference")
    assert res.returncode == 2 and "budget mode" in res.stderr
