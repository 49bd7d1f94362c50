"""`globalcom2 eval` and `globalcom2 visualize --methods` as real subprocesses; eval plans equal the adapters' plans."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from tests.conftest import assert_sweep_plans_match
from tests.test_cli import run_cli


def test_eval_quick_writes_tables_and_plots(tmp_path):
    out = tmp_path / "eval"
    res = run_cli("eval", "--quick", "--ratios", "0.25,0.1", "--out", str(out), "--no-progress", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["ratios"] == [0.25, 0.1] and list(data["photos"]) == ["astronaut"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    methods = {(r["group"], r["method"]) for r in rows}
    vision = ("globalcom2", "fastervlm", "random", "pooling", "prumerge", "prumerge+")
    assert {("method", m) for m in vision} <= methods
    assert {("llm", "fastv"), ("llm", "globalcom2+fastv"), ("ablation", "globalcom2")} <= methods
    by = {(r["group"], r["method"], r["ratio"], r["allocation"], r["scoring"]): r for r in rows}
    for ratio in ("0.25", "0.1"):
        gc = by[("method", "globalcom2", ratio, "", "")]
        rnd = by[("method", "random", ratio, "", "")]
        # budget mode: same token count; GlobalCom² keeps far more of the stand-in's attention mass than random
        assert gc["llm_share"] == rnd["llm_share"]
        assert float(gc["crop_mass"]) > float(rnd["crop_mass"]) + 0.1
        assert abs(float(rnd["crop_mass"]) - float(ratio)) < 0.1
        # the ablation's default setting is the method row itself
        abl = by[("ablation", "globalcom2", ratio, "softmax-sum", "holistic")]
        assert math.isclose(float(abl["crop_mass"]), float(gc["crop_mass"]))
    report = (out / "report.md").read_text()
    assert "STAND-IN" in report and "NOT accuracy" in report and "mechanism only" in report
    # PruMerge's count ignores R: one "adaptive" row each, not one copy per R
    for method in ("prumerge", "prumerge+"):
        assert sum(line.startswith(f"| adaptive | {method} |") for line in report.splitlines()) == 1
        assert f"% | {method} |" not in report
    for name in ("eval_methods.png", "eval_allocation.png", "eval_ablation.png"):
        assert f"![{name}]({name})" in report
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 400


def test_eval_rejects_unknown_photo(tmp_path):
    res = run_cli("eval", "--photos", "nope", "--out", str(tmp_path / "x"), "--no-progress")
    assert res.returncode == 2 and "unknown photo" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from globalcom2.demo.run import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo"))


def test_eval_plans_equal_plans_through_the_model(demo):
    """The sweep's shortcut (one tower pass, then the planners) gives the adapters' plans."""
    from globalcom2.demo.photos import load_photo

    model, processor = demo
    # random: the sweep's draw 0 at seed 0 is the random method's draw at its default seed 0
    methods = ("globalcom2", "fastervlm", "random", "pooling")
    assert_sweep_plans_match(model, processor, "coffee", load_photo("coffee"), methods)


def test_visualize_methods_grid(tiny_clip_dir, tmp_path):
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    ckpt = build_tiny_llava_next(tmp_path / "ckpt", text_layers=4)
    img = tmp_path / "photo.png"
    from tests.conftest import random_image

    random_image(120, 200, seed=3).save(img)
    out = tmp_path / "grid.png"
    methods = "globalcom2,fastervlm,fastv,pooling,random,globalcom2+fastv"
    res = run_cli("visualize", "--model", str(ckpt), "--image", str(img), "--methods", methods, "--ratio", "0.25",
                  "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert [p["method"] for p in data["plans"]] == methods.split(",")
    counts = {p["method"]: p["num_tokens"] for p in data["plans"]}
    assert counts["globalcom2"] == counts["fastervlm"] == counts["random"] == counts["globalcom2+fastv"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 1000
    bad = run_cli(
        "visualize", "--model", str(ckpt), "--image", str(img), "--methods", "nope", "--out", str(out)
    )
    assert bad.returncode == 2 and "unknown method" in bad.stderr


@pytest.mark.full
def test_eval_on_qwen3_5_leaves_out_what_its_stand_in_refuses(tmp_path):
    """Regression: `eval --family qwen3_5` died on FastV's default scoring layer, a linear-attention one on its
    stand-in. The refused methods are now named in the summary and the report, and the rest runs."""
    from globalcom2.evaluation.runner import run_family_eval

    summary = run_family_eval(tmp_path, "qwen3_5", quick=True, progress=False, log=lambda *a: None)
    refused = summary["methods_refused"]
    assert "fastv" in refused and "linear-attention" in refused["fastv"]
    assert not set(refused) & set(summary["methods"]) and "globalcom2" in summary["methods"]
    assert {r["method"] for r in summary["rows"]}.isdisjoint(refused)
    report = (tmp_path / "report.md").read_text()
    assert "Not run here: `fastv`" in report
