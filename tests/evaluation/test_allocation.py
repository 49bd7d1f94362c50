"""The allocation numbers behind docs/allocation.md: S_j, sigma and r_j step by step equal the library's plans."""

from __future__ import annotations

import math

import pytest
import torch

from globalcom2.evaluation.allocation import allocation_numbers, markdown_table
from globalcom2.evaluation.runner import photo_data
from tests.conftest import random_image


@pytest.mark.parametrize("tau", [10.0, 0.05])
def test_allocation_numbers_follow_eq_2_to_4_and_equal_the_plans(tiny, tau) -> None:
    model, processor = tiny
    photos = [("wide", random_image(120, 200, seed=3)), ("tall", random_image(200, 90, seed=4))]
    rows = allocation_numbers(model, processor, photos, ratio=0.25, tau=tau)
    assert [(r.photo, r.score) for r in rows] == [(p, s) for p, _ in photos for s in ("logits", "softmax")]
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for row in rows:
        image = dict(photos)[row.photo]
        thumb = photo_data(model, processor, row.photo, image).scores[row.score][0].reshape(g, g)
        n_rows, n_cols = row.grid
        ph, pw = max(g // n_rows, 1), max(g // n_cols, 1)
        expected = [0.0] * (n_rows * n_cols)  # Eq. 2 by hand: cell (i, j) -> crop (min(i//ph, rows-1), ...)
        for i in range(g):
            for j in range(g):
                expected[min(i // ph, n_rows - 1) * n_cols + min(j // pw, n_cols - 1)] += float(thumb[i, j])
        assert row.richness == pytest.approx(expected, rel=1e-5, abs=1e-6)
        weights = [math.exp((s - max(expected)) / tau) for s in expected]  # Eq. 3
        assert row.sigma == pytest.approx([w / sum(weights) for w in weights], abs=1e-6)
        n = len(expected)
        assert row.ratios == pytest.approx(
            [min(1.0, 0.25 * (1 + s - 1 / n)) for s in row.sigma], abs=1e-6
        )  # Eq. 4
        assert row.ratios == pytest.approx(row.plan_ratios, abs=1e-6)  # = the library's Plan.crop_ratios
        assert row.gap == pytest.approx(sorted(expected)[-1] - sorted(expected)[-2], rel=1e-5, abs=1e-6)
        if row.score == "softmax":  # probabilities: the crops share at most the whole mass
            assert 0 < sum(row.richness) <= 1 + 1e-5
    table = markdown_table(rows)
    assert table.count("\n") == 1 + len(rows) and "| NO |" not in table and f"τ = {tau:g}" in table


def test_logit_sums_make_sigma_one_hot_and_probabilities_make_it_flat(tiny) -> None:
    """What docs/allocation.md explains: the scale of S_j against tau decides sigma."""
    model, processor = tiny
    rows = {r.score: r for r in allocation_numbers(model, processor, [("p", random_image(120, 200, seed=3))])}
    soft = rows["softmax"]
    n = len(soft.sigma)
    assert soft.gap / soft.tau < 0.1 and max(abs(s - 1 / n) for s in soft.sigma) < 0.01
    assert all(abs(r - 0.1) < 0.001 for r in soft.ratios)
    logits = rows["logits"]
    assert logits.spread > soft.spread  # sums of logits spread far more than sums of probabilities
    top = torch.tensor(logits.sigma).max().item()
    assert top >= 1 / (1 + (n - 1) * math.exp(-logits.gap / logits.tau)) - 1e-6  # the bound quoted in the doc
