"""The explorer's logic without a browser (`globalcom2.app.explore`, `globalcom2.app.ui._compress`): its counts are
`apply`'s plans, the page's tables and the plan JSON agree, and bad input is a message."""

from __future__ import annotations

import json
import re

import pytest

from globalcom2.app.explore import ExploreError, Explorer, ExploreRequest, counts_markdown
from globalcom2.app.ui import _compress
from globalcom2.bench.flops import paper_prefill_flops
from globalcom2.evaluation.visual import method_plan
from globalcom2.viz.numbers import panel_numbers
from globalcom2.workflows import plan_for_image, render_plan
from tests.conftest import random_image

OPTIONS = {"mode": "budget", "allocation": "softmax-sum", "scoring": "holistic", "score": "logits",
           "importance": "auto", "alpha": 0.5, "tau": 10.0}  # fmt: skip


@pytest.fixture(scope="module")
def explorer(tiny_clip_dir):
    ex = Explorer(str(tiny_clip_dir))
    ex.load()
    return ex


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The first table of ``counts_markdown``: method -> its cells."""
    rows = {}
    for line in markdown.split("\n\n")[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_counts_are_applys_plans_and_tables_match_json(explorer, tmp_path):
    image = random_image(90, 130, seed=3)
    request = ExploreRequest(methods=("globalcom2", "fastervlm"), ratio=0.3, options=OPTIONS)
    result = explorer.run(image, "blobs.png", request)
    model, processor = explorer.load()
    expected = {
        "globalcom2": plan_for_image(model, processor, image, ratio=0.3, **OPTIONS),
        "fastervlm": method_plan(model, processor, image, "fastervlm", 0.3, question="q"),
    }
    rows = _table_rows(result.markdown)
    payload = json.loads(json.dumps(result.payload))  # what the download holds
    assert [r["method"] for r in payload["plans"]] == ["globalcom2", "fastervlm"]
    for record in payload["plans"]:
        plan = expected[record["method"]]
        numbers = panel_numbers(plan)
        assert record["num_tokens"] == plan.num_tokens and record["num_tokens_full"] == plan.num_tokens_full
        assert record["crop_tokens"] == list(numbers.crop_tokens)
        assert record["thumbnail_tokens"] == numbers.thumbnail_tokens
        assert record["prefill_tflops_7b"] == pytest.approx(paper_prefill_flops(plan.num_tokens) / 1e12)
        cells = rows[record["method"]]
        assert [int(c) for c in cells[1:6]] == [plan.num_tokens, plan.num_tokens_full, numbers.thumbnail_tokens,
                                                numbers.crops_tokens, numbers.newline_tokens]  # fmt: skip
        assert float(cells[6]) == pytest.approx(record["prefill_tflops_7b"], abs=0.005)
    # the per-crop table: a row per crop, a column per method, r_j and k_j/N_j of apply's plans
    crop_lines = result.markdown.split("\n\n")[-1].splitlines()
    methods = [c.strip() for c in crop_lines[0].strip("|").split("|")][1:]
    assert methods == ["globalcom2", "fastervlm"]
    for j, line in enumerate(crop_lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(j + 1)
        for method, cell in zip(methods, cells[1:], strict=True):
            nb = panel_numbers(expected[method])
            assert cell == f"{nb.crop_ratios[j]:.3f}, {nb.crop_tokens[j]}/{nb.crop_cells[j]}"
    assert len(crop_lines) - 2 == len(panel_numbers(expected["globalcom2"]).crop_tokens) > 1
    # one panel per method, side by side
    assert result.picture.width > result.picture.height
    assert counts_markdown(payload["plans"]) == result.markdown


def test_max_image_tokens_budget(explorer):
    image = random_image(100, 100, seed=1)
    result = explorer.run(
        image, "x", ExploreRequest(methods=("globalcom2",), ratio=None, max_image_tokens=40)
    )
    model, processor = explorer.load()
    plan = plan_for_image(model, processor, image, ratio=None, max_image_tokens=40)
    assert result.records[0]["num_tokens"] == plan.num_tokens <= 40
    assert result.records[0]["ratio"] == pytest.approx(plan.ratio)
    # the page's picture is `globalcom2 visualize`'s drawing of apply's plan, pixel for pixel
    import numpy as np

    from globalcom2.viz.overlay import TITLE_KEY

    title = result.picture.info[TITLE_KEY]
    assert "T = 40" in title
    drawn = render_plan(image, plan, model, title)
    assert np.array_equal(np.asarray(drawn), np.asarray(result.picture))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (ExploreRequest(methods=("globalcom2",), ratio=0.0), r"`ratio` must be in \(0, 1\]"),
        (ExploreRequest(methods=("globalcom2",), ratio=None, max_image_tokens=1), "too small for this image"),
        (ExploreRequest(methods=("globalcom2",), ratio=None, max_image_tokens=-5), "max_image_tokens"),
        (ExploreRequest(methods=(), ratio=0.5), "at least one method"),
        (ExploreRequest(methods=("nope",), ratio=0.5), "unknown method"),
        (ExploreRequest(methods=("globalcom2",), ratio=0.5, options={"tau": -1.0}), "tau"),
    ],
)
def test_bad_budgets_and_options_are_messages(explorer, request_, message):
    with pytest.raises(ExploreError, match=message):
        explorer.run(random_image(64, 96), "x", request_)


def test_page_handler_messages(explorer, tmp_path):
    """`_compress`, the Compress button's handler: bad uploads and budgets give a message and no result."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    args = ("llava_next", ["globalcom2"], "ratio R", 0.25, 288, "q", *OPTIONS.values())
    message, picture, tables, plan = _compress(explorer, "astronaut", str(text), *args)
    assert message.startswith("**Error:**") and "cannot read image notes.txt" in message
    assert str(tmp_path) not in message  # the server's temporary path is not shown
    assert (picture, tables, plan) == (None, "", None)
    tiny = tmp_path / "tiny.png"
    random_image(1, 1).save(tiny)
    message, picture, tables, plan = _compress(explorer, None, str(tiny), *args)
    assert "1x1 px" in message and picture is not None  # a tiny image runs, with a warning
    assert json.loads(open(plan).read())["image"] == {"name": "tiny.png", "width": 1, "height": 1}
    message, *_ = _compress(explorer, None, str(tiny), "llava_next", ["globalcom2"], "max image tokens T", 0.25,
                            2.5, "q", *OPTIONS.values())  # fmt: skip
    assert re.search(r"T must be a positive integer, got 2.5", message)


def test_cli_usage_errors_and_missing_gradio(monkeypatch, capsys):
    """`globalcom2 explore`: a bad port is a usage error; without Gradio one line names the pip command (exit 2)."""
    import sys

    from globalcom2.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["explore", "--port", "0"])
    assert exc.value.code == 2 and "port must be in 1..65535" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if it were not installed
    assert main(["explore"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == 'globalcom2: error: gradio is not installed (needed for globalcom2 explore): pip install "globalcom2[app]"'
    )
