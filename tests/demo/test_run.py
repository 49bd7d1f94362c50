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
