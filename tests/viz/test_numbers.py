"""Figures and JSON state the same numbers, in words that fit each method; one rounding rule for r_j labels."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from globalcom2.evaluation.visual import method_plan, method_record, visualize_methods  # noqa: E402
from globalcom2.methods import METHODS  # noqa: E402
from globalcom2.methods.vision import pooled_side  # noqa: E402
from globalcom2.viz import overlay  # noqa: E402
from globalcom2.viz.numbers import format_ratio, panel_numbers, panel_text  # noqa: E402
from tests.conftest import random_image  # noqa: E402

QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A tiny LLaVA-NeXT with a 4-layer LLM (FastV prunes at layer 2), loaded with from_pretrained."""
    from globalcom2.demo.tiny_model import build_tiny_llava_next, load_tiny

    return load_tiny(build_tiny_llava_next(tmp_path_factory.mktemp("tiny4"), text_layers=4))


# ------------------------------------------------------------------------------------------- format_ratio

# Multi-stage LLM-side methods keep a layer average of R: on the tiny 4-layer LLM only R = 0.5 is reachable.
STAGED = ("pdrop", "sparsevlm", "globalcom2+sparsevlm")


def test_format_ratio_rounds_halves_up_whatever_the_binary_value() -> None:
    # float32 stores 0.075 just above and 0.175 just below the half: "%.2f" gave "0.08" and "0.17".
    assert float(np.float32(0.075)) > 0.075 and float(np.float32(0.175)) < 0.175
    assert format_ratio(np.float32(0.075), 2) == "0.08" and format_ratio(np.float32(0.175), 2) == "0.18"
    assert format_ratio(np.float32(0.075)) == "0.075" and format_ratio(np.float32(0.175)) == "0.175"
    below = np.nextafter(np.float32(0.4375), np.float32(0))  # a half stored one ulp low
    assert (
        format_ratio(below) == "0.438"
        and format_ratio(0.1875) == "0.188"
        and format_ratio(torch.tensor(0.5)) == "0.500"
    )
    assert format_ratio(1.0) == "1.000" and format_ratio(0.0) == "0.000" and format_ratio(0.1) == "0.100"
    # every decimal half at 3 places, stored as float32 or float64, rounds up
    for k in range(1000):
        half = (2 * k + 1) / 2000
        up = f"{(k + 1) / 1000:.3f}"
        assert format_ratio(half) == up == format_ratio(np.float32(half)), half


# ------------------------------------------------------------------------------------------- panel text == JSON

_TOKEN_LINE = re.compile(
    r"^image tokens (?:to the LLM|in the LLM after pruning): (\d+) of (\d+) \([\d.]+ %\) = thumbnail (\d+)"
    r"(?: \+ crops (\d+))?(?: \+ newlines (\d+))?(?: \+ merged remainders (\d+))?$"
)
_KEPT_THUMB = re.compile(r"^thumbnail: kept (\d+) of (\d+) tokens$")
_KEPT_CROPS = re.compile(r"^crops (\d+)x(\d+): kept (\d+) of (\d+) tokens$")
_MERGED = re.compile(r"^(.*), the other (\d+) merged into them$")
_KEPT_LABEL = re.compile(r"^\$r_\{(\d+)\}\$ = (\d\.\d{3})\nkept (\d+)/(\d+)$")
_AVG_THUMB = re.compile(r"^thumbnail: (\d+) tokens averaged into (\d+)$")
_AVG_CROPS = re.compile(r"^crops (\d+)x(\d+): (\d+) tokens averaged into (\d+)$")
_AVG_LABEL = re.compile(r"^averaged\n(\d+) → (\d+)$")


def _match(pattern: re.Pattern, text: str) -> tuple[int, ...]:
    found = pattern.match(text)
    assert found, (pattern.pattern, text)
    return tuple(int(v) for v in found.groups(default="0"))


def _check_text_against_record(text, r: dict) -> None:
    """Every number the panel prints equals the JSON record ``r``'s; the words fit the method."""
    num, full, thumb, crops, newlines, extra = _match(_TOKEN_LINE, text.token_line)
    assert (num, full) == (r["num_tokens"], r["num_tokens_full"])
    assert (thumb, crops, newlines) == (r["thumbnail_tokens"], r["crops_tokens"], r["newline_tokens"])
    assert extra == r["extra_tokens"] and (extra == 0 or r["reduction"] == "merged")
    assert thumb + crops + newlines + extra == num
    rows, cols = r["grid"]
    if r["reduction"] == "averaged":
        assert "kept" not in text.thumbnail_header + text.crops_header + "".join(text.crop_labels)
        assert _match(_AVG_THUMB, text.thumbnail_header) == (r["thumbnail_cells"], r["thumbnail_tokens"])
        assert _match(_AVG_CROPS, text.crops_header) == (rows, cols, r["crops_cells"], r["crops_tokens"])
        for j, label in enumerate(text.crop_labels):
            assert _match(_AVG_LABEL, label) == (r["crop_cells"][j], r["crop_tokens"][j])
        assert r["thumbnail_kept"] is None and r["crops_kept"] is None
    else:
        thumb_header, crops_header = text.thumbnail_header, text.crops_header
        if r["reduction"] == "merged":  # PruMerge: "..., the other N merged into them"
            found_t, found_c = _MERGED.match(thumb_header), _MERGED.match(crops_header)
            assert found_t and found_c, (thumb_header, crops_header)
            assert int(found_t[2]) == r["thumbnail_cells"] - r["thumbnail_tokens"]
            assert int(found_c[2]) == r["crops_cells"] - r["crops_tokens"]
            thumb_header, crops_header = found_t[1], found_c[1]
        assert _match(_KEPT_THUMB, thumb_header) == (r["thumbnail_tokens"], r["thumbnail_cells"])
        assert _match(_KEPT_CROPS, crops_header) == (rows, cols, r["crops_tokens"], r["crops_cells"])
        for j, label in enumerate(text.crop_labels):
            found = _KEPT_LABEL.match(label)
            assert found, label
            assert int(found[1]) == j + 1 and found[2] == format_ratio(r["crop_ratios"][j])
            assert (int(found[3]), int(found[4])) == (r["crop_tokens"][j], r["crop_cells"][j])
        assert r["thumbnail_kept"] == r["thumbnail_tokens"]
        assert r["crops_kept"] == r["crops_tokens"] == sum(r["crop_keep_counts"])
    assert len(text.crop_labels) == rows * cols == len(r["crop_tokens"])
    assert r["crops_tokens"] == sum(r["crop_tokens"]) and r["crops_cells"] == sum(r["crop_cells"])


def test_every_panel_states_the_numbers_of_its_json_record(tiny4, tmp_path, monkeypatch, capsys) -> None:
    """`visualize --methods <all> --json`: the text drawn on each panel and the printed record agree."""
    model, processor = tiny4
    image = random_image(120, 200, seed=3)
    drawn = []
    real_panel_text = overlay.panel_text

    def recording_panel_text(numbers):
        text = real_panel_text(numbers)
        drawn.append(text)
        return text

    monkeypatch.setattr(overlay, "panel_text", recording_panel_text)
    methods = [m for m in METHODS if m not in STAGED]
    args = argparse.Namespace(ratio=0.1, ratios=None, model="tiny", image="photo.png", question=QUESTION,
                              out=str(tmp_path / "grid.png"), json=True)  # fmt: skip
    assert visualize_methods(args, methods, image, model, processor, {}) == 0
    records = json.loads(capsys.readouterr().out)["plans"]
    assert [r["method"] for r in records] == methods and len(drawn) == len(methods)
    for text, record in zip(drawn, records, strict=True):
        _check_text_against_record(text, record)

    by_method = {r["method"]: r for r in records}
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pool = by_method["pooling"]  # averaged: pooled tokens, never the 576/576 cells it covers
    assert pool["thumbnail_tokens"] == pooled_side(g, 0.1) ** 2 < pool["thumbnail_cells"] == g * g
    assert pool["crops_tokens"] < pool["crops_cells"]
    assert by_method["globalcom2"]["thumbnail_tokens"] == int(g * g * 0.1)
    for method in ("fastv", "globalcom2+fastv"):
        assert by_method[method]["stage"] != "vision"
    assert drawn[methods.index("fastv")].token_line.startswith("image tokens in the LLM after pruning")
    staged = argparse.Namespace(**{**vars(args), "ratio": 0.5})  # the 4-layer LLM averages R = 0.5, not 0.1
    drawn.clear()
    assert visualize_methods(staged, list(STAGED), image, model, processor, {}) == 0
    staged_records = json.loads(capsys.readouterr().out)["plans"]
    for text, record in zip(drawn, staged_records, strict=True):
        _check_text_against_record(text, record)
        assert record["stage"] != "vision" and len(record["layer_tokens"]) == 4


def test_method_record_is_the_panel_numbers(tiny4) -> None:
    """The JSON record and the panel are both the plan's panel_numbers, for every method's real plan."""
    model, processor = tiny4
    image = random_image(100, 180, seed=1)
    for method in METHODS:
        ratio = 0.5 if method in STAGED else 0.25
        plan = method_plan(model, processor, image, method, ratio, question=QUESTION)
        record = method_record(method, ratio, plan)
        _check_text_against_record(panel_text(panel_numbers(plan)), record)
        assert record["num_tokens"] == plan.num_tokens


def test_hand_made_plan_without_counts_is_counted_on_its_masks() -> None:
    from globalcom2.core.plan import Plan

    keep = torch.zeros(48, 48, dtype=torch.bool)
    keep[:, :12] = True
    plan = Plan(grid=(2, 2), thumbnail_mask=torch.ones(24, 24, dtype=torch.bool), crops_mask=keep,
                crop_ratios=torch.full((4,), 0.5), num_tokens=100, num_tokens_full=200)  # fmt: skip
    numbers = panel_numbers(plan)
    assert numbers.crop_tokens == (288, 0, 288, 0) and numbers.crop_cells == (576,) * 4
    assert numbers.thumbnail_tokens == 576 and numbers.reduction == "kept"
