"""`globalcom2 demo` (run_demo) on a tiny model: the files it says it wrote are the files it wrote."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("skimage")


def test_demo_reports_the_overlays_it_writes(tiny_clip_dir, tmp_path, monkeypatch) -> None:
    from globalcom2.demo import run
    from globalcom2.demo.tiny_model import load_tiny

    monkeypatch.setattr(run, "build_demo_model", lambda workdir, **_: load_tiny(tiny_clip_dir))
    lines: list[str] = []
    out = tmp_path / "demo"
    photos, ratios = ("astronaut", "chelsea"), (0.5, 0.25, 0.1)
    summary = run.run_demo(out, photos=photos, ratios=ratios, repeats=1, progress=False, log=lines.append)
    written = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").iterdir())
    assert len(written) == len(photos) * (len(ratios) + 1)  # one per photo and R, plus one grid per photo
    closing = lines[-1]
    said = re.search(r"and (\d+) overlay PNGs", closing)
    assert said and int(said[1]) == len(written), closing
    assert f"({len(photos)} photos x {len(ratios)} ratios, plus one grid per photo)" in closing
    assert sorted(summary["overlay_files"]) == written
    assert json.loads((out / "summary.json").read_text())["overlay_files"] == summary["overlay_files"]
    # summary results carry the figure's numbers; the report prints r_j with the one rounding rule
    for name in photos:
        for r in summary["photos"][name]["results"]:
            assert r["thumbnail_tokens"] + r["crops_tokens"] + r["newline_tokens"] == r["num_tokens"]
    labels = re.findall(r"r_j = ([^;]*);", (out / "report.md").read_text())
    assert len(labels) == len(photos) * len(ratios)
    assert all(re.fullmatch(r"\d\.\d{3}", f) for line in labels for f in line.split(", "))
    # one timing round: the table says so, and says its speed-ups are not estimates
    tables = "\n".join(lines)
    assert "(one round;" in tables and run.ONE_ROUND_NOTE in tables
    assert run.ONE_ROUND_NOTE in (out / "report.md").read_text()
    assert "(budget mode; thumbnail + crops + newlines)" in tables  # the family's own layout


def test_timing_table_of_several_rounds_has_no_one_round_note() -> None:
    from globalcom2.demo.run import ONE_ROUND_NOTE, format_tables

    row = {"compressed": False, "ratio": 1.0, "image_tokens": 10, "prompt_tokens": 20, "vision_ms_median": 1.0,
           "prefill_ms_median": 2.0, "prefill_ms_min": 1.5, "prefill_ms_max": 2.5, "prefill_speedup": 1.0}  # fmt: skip
    result = {"ratio": 0.5, "grid": [2, 2], "num_tokens_full": 10, "num_tokens": 5}
    summary = {"token_layout": "crops + thumbnail; <img>, </img> not counted", "machine": {"threads": 2},
               "photos": {"x": {"size_hw": [4, 4], "results": [result]}},
               "end_to_end": {"photo": "x", "rounds": 5, "rows": [row]}}  # fmt: skip
    text = format_tables(summary)
    assert ONE_ROUND_NOTE not in text and "median of 5 interleaved rounds" in text
    assert "(budget mode; crops + thumbnail; <img>, </img> not counted)" in text and "1.5-2.5" in text
