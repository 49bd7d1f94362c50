"""The `globalcom2` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import random_image


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-m", "globalcom2.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    random_image(120, 200, seed=3).save(path)
    return path


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("demo", "ask", "visualize"):
        assert cmd in res.stdout


def test_eval_and_bench_offer_every_registered_family():
    """`eval --family` and `bench --table4 --family` take every family of the adapter registry (the choices come
    from it), and eval's help says which stand-ins have a random tower."""
    import re

    from globalcom2.adapters.registry import ADAPTERS
    from globalcom2.demo.tiny_families import RANDOM_TOWER_FAMILIES

    for command in ("eval", "bench"):
        res = run_cli(command, "--help")
        assert res.returncode == 0, res.stderr
        choices = re.search(r"--family \{([^}]*)\}", res.stdout)
        assert choices is not None and set(choices.group(1).split(",")) == set(ADAPTERS), command
    text = " ".join(run_cli("eval", "--help").stdout.split())
    assert all(f in text for f in RANDOM_TOWER_FAMILIES) and "RANDOM" in text


def test_demo_offers_the_families_it_has_notes_for():
    from globalcom2.demo.run import FAMILY_NOTES
    from globalcom2.demo.tiny_families import DEMO_FAMILIES

    assert set(DEMO_FAMILIES) == set(FAMILY_NOTES)


def test_every_registered_family_has_a_standin_builder(tmp_path, monkeypatch):
    """`build_standin_checkpoint` knows every registered family: each reaches its own builder (recorded here
    instead of building: the stand-ins take minutes), none falls through to LLaVA-NeXT's."""
    from globalcom2.adapters.registry import ADAPTERS
    from globalcom2.demo import tiny_families, tiny_idefics3, tiny_model, tiny_qwen, tiny_tiling

    called: list[str] = []

    def fake(name):
        return lambda out_dir, *args, **kwargs: called.append(name) or out_dir

    modules = (tiny_families, tiny_idefics3, tiny_model, tiny_qwen, tiny_tiling)
    for module in modules:
        for attr in dir(module):
            if attr.startswith("build_tiny") or attr in ("standin_internvl_vision_model",):
                monkeypatch.setattr(module, attr, fake(attr))
    monkeypatch.setattr("globalcom2.demo.encoder.load_standin_vision_tower", lambda *a, **k: None)
    for family in ADAPTERS:
        called.clear()
        tiny_families.build_standin_checkpoint(tmp_path, family=family)
        assert called and (family == "llava_next") == (called[-1] == "build_tiny_llava_next"), (
            family,
            called,
        )


def test_visualize_writes_png_and_json(tiny_clip_dir, photo_file, tmp_path):
    out = tmp_path / "overlay.png"
    res = run_cli("visualize", "--model", str(tiny_clip_dir), "--image", str(photo_file), "--ratios", "0.5,0.1",
                  "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [p["ratio"] for p in data["plans"]] == [0.5, 0.1]
    assert (
        data["plans"][1]["num_tokens"] < data["plans"][0]["num_tokens"] < data["plans"][0]["num_tokens_full"]
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300


def test_ask_prints_answer_and_counts(tiny_clip_dir, photo_file):
    res = run_cli("ask", "--model", str(tiny_clip_dir), "--image", str(photo_file), "--ratio", "0.25",
                  "--max-new-tokens", "4", "--json", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data["answer"], str)
    assert data["image_tokens"] < data["image_tokens_full"]


@pytest.mark.parametrize(
    "content, words",
    [(b"this is not an image", "cannot read image"), (None, "cannot read image")],
    ids=["text-file", "truncated-png"],
)
def test_bad_image_file_is_one_clean_line(tiny_clip_dir, photo_file, tmp_path, content, words):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content if content is not None else photo_file.read_bytes()[:300])
    res = run_cli("ask", "--model", str(tiny_clip_dir), "--image", str(bad), "--ratio", "0.25", "q")
    assert res.returncode == 2
    assert words in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("ratio", ["0", "1.5", "nan", "abc"])
def test_bad_ratio_is_rejected(tiny_clip_dir, photo_file, ratio):
    res = run_cli("ask", "--model", str(tiny_clip_dir), "--image", str(photo_file), "--ratio", ratio, "q")
    assert res.returncode == 2 and "ratio" in res.stderr and "Traceback" not in res.stderr


def test_missing_model_is_one_clean_line(photo_file, tmp_path):
    res = run_cli(
        "ask", "--model", str(tmp_path / "nowhere"), "--image", str(photo_file), "--ratio", "0.5", "q"
    )
    assert res.returncode == 2 and "cannot load model" in res.stderr and "Traceback" not in res.stderr


def test_demo_runs_end_to_end(tmp_path):
    """The main job, small: one real photo, one ratio, the real DINOv2 stand-in and the tiny LLM."""
    res = run_cli("demo", "--out", str(tmp_path / "demo"), "--photos", "astronaut", "--ratios", "0.25",
                  "--repeats", "1", "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    result = summary["photos"]["astronaut"]["results"][0]
    assert result["grid"] == [2, 2] and result["num_tokens_full"] == 2928
    # Budget formula: int(576 * 0.25) + int(0.25 * 48 * 48) + 48 newlines.
    assert result["num_tokens"] == 144 + 576 + 48
    rows = summary["end_to_end"]["rows"]
    assert rows[0]["image_tokens"] == 2928 and rows[1]["image_tokens"] == 768
    assert "STAND-IN" in summary["note"]
    with Image.open(tmp_path / "demo" / "overlays" / "astronaut.png") as im:
        assert im.format == "PNG"
    assert "![astronaut]" in (tmp_path / "demo" / "report.md").read_text()
