"""`globalcom2 eval --task defects`: the detector works uncompressed, R = 100 % equals uncompressed exactly, the
metrics and the mosaic geometry are right, and the run is deterministic."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from globalcom2.adapters.anyres import anyres_geometry
from globalcom2.evaluation.defects import (
    UNCOMPRESSED,
    auroc,
    cell_tiles,
    crop_overlap,
    detection_rate,
    make_mosaics,
    run_defects,
)

STANDIN_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# The ratio-driven methods keep (or pool into) every token at R = 100 %; PruMerge(+) ignores R.
RATIO_METHODS = ("globalcom2", "fastervlm", "random", "pooling")
SUBSET = {"num_train": 6, "num_test": 5, "kinds": ("local",), "layouts": ((2, 2),), "num_boot": 200}


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    pytest.importorskip("conformal_clip_data")
    out = tmp_path_factory.mktemp("defects")
    return out, run_defects(out, ratios=(1.0, 0.1), progress=False, log=lambda *_: None, **SUBSET)


def test_auroc_and_detection_rate():
    pos, neg = torch.tensor([0.9, 0.8, 0.3]), torch.tensor([0.1, 0.3, 0.2, 0.0])
    # pairs: 0.9 and 0.8 beat all 4; 0.3 beats 3 and ties 1 -> (4 + 4 + 3.5) / 12
    assert float(auroc(pos, neg)) == pytest.approx(11.5 / 12)
    assert float(auroc(neg, neg)) == pytest.approx(0.5)
    # far = 25 % of 4 negatives: one may exceed the threshold (0.2): 0.9, 0.8 and 0.3 are above it
    assert float(detection_rate(pos, neg, 0.25)) == 1.0
    assert float(detection_rate(pos, neg, 0.0)) == pytest.approx(2 / 3)  # threshold 0.3, the top negative
    batched = auroc(torch.stack([pos, pos]), torch.stack([neg, neg]))
    assert batched.shape == (2,) and torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("size, layout", [((500, 500), (2, 2)), ((500, 750), (2, 3))])
def test_mosaic_geometry(size, layout):
    geo = anyres_geometry(size, STANDIN_PINPOINTS, 336, 24)
    assert geo.grid == (2, 2)  # both layouts become a 2x2 crop grid (the 2x3 one with padding)
    tiles = cell_tiles(geo, layout)
    top, bottom, left, right = geo.box
    assert tiles.shape == ((bottom - top) * (right - left),)
    counts = torch.bincount(tiles, minlength=layout[0] * layout[1])
    assert counts.shape == (layout[0] * layout[1],) and bool((counts > 0).all())
    overlap = crop_overlap(geo, layout)
    assert overlap.sum() == (bottom - top) * (right - left)
    if layout == (2, 2):  # each crop is exactly one textile image
        assert torch.equal(overlap, torch.eye(4) * 24 * 24)


def test_mosaics_split_by_source_image():
    pytest.importorskip("conformal_clip_data")
    from globalcom2.evaluation.defects import data_root

    train, test = make_mosaics(data_root(), num_train=6, num_test=5)
    files = [f for m in train + test for f in m.files]
    assert len(files) == len(set(files))  # no image in two mosaics, so none in train and test
    assert all(m.kind == "nominal" and m.defect_tile == -1 for m in train)
    for m in test:
        defect = [i for i, f in enumerate(m.files) if not f.startswith("nominal/")]
        assert defect == ([] if m.kind == "nominal" else [m.defect_tile])
        assert all(f.startswith(f"{m.kind}/") for i, f in enumerate(m.files) if i in defect)
    assert make_mosaics(data_root(), num_train=6, num_test=5) == (train, test)  # seeded


def test_detector_above_chance_and_full_ratio_equals_uncompressed(subset_run):
    out, result = subset_run
    summary = {(s["method"], s["ratio"]): s for s in result["summary"]}
    base = summary[UNCOMPRESSED, 1.0]
    assert base["num_defect"] == 5 and base["num_nominal"] == 5
    assert base["auroc"] >= 0.8, base
    rows = {(r["mosaic"], r["method"], r["ratio"]): r for r in result["rows"]}
    mosaics = {r["mosaic"] for r in result["rows"]}
    keys = ("score_max", "score_mean", "flagged_tile", "tokens_scored")
    for method in RATIO_METHODS:
        for mosaic in mosaics:
            full, plain = rows[mosaic, method, 1.0], rows[mosaic, UNCOMPRESSED, 1.0]
            assert {k: full[k] for k in keys} == {k: plain[k] for k in keys}, (method, mosaic)
            assert rows[mosaic, method, 0.1]["tokens_scored"] < plain["tokens_scored"] // 5
        assert summary[method, 1.0]["auroc"] == base["auroc"]
    # GlobalCom²'s allocation is reported for the defect tiles
    assert 0.0 <= summary["globalcom2", 0.1]["defect_tile_up"] <= 1.0
    # written outputs
    data = json.loads((out / "summary.json").read_text())
    assert data["meta"]["fingerprint"] == result["meta"]["fingerprint"]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == len(result["rows"])
    report = (out / "report.md").read_text()
    assert "STAND-IN" in report and "NOT an LVLM's answer" in report
    assert (out / "defects.png").stat().st_size > 10_000


@pytest.mark.full
def test_defects_deterministic(subset_run):
    """Same numbers twice (fresh model load, fresh banks, fresh bootstrap)."""
    _, first = subset_run
    again = run_defects(
        "unused", ratios=(1.0, 0.1), progress=False, write=False, log=lambda *_: None, **SUBSET
    )
    assert again["meta"]["fingerprint"] == first["meta"]["fingerprint"]
    assert again["summary"] == first["summary"]
