"""`ratio_for_max_tokens` / `largest_fitting_ratio` (the per-image token budget) against brute force.

The budget-mode count ``overhead + int(N*R) + int(R*S)`` is a step function of R whose steps sit next to the
fractions k/N and m/S. The brute force evaluates it at every such fraction and a few float64 neighbours on both
sides (so every step is seen from both sides), independently of the bisection, and checks that the function returns
the most tokens that fit, at the largest R that gives them.
"""

from __future__ import annotations

import math
import random

import pytest

from globalcom2 import GlobalComConfig
from globalcom2.core.budget import budget_counts, largest_fitting_ratio, ratio_for_max_tokens


def _count(n: int, s: int, overhead: int, r: float) -> int:
    return overhead + sum(budget_counts(n, s, r))


def _candidates(n: int, s: int) -> list[float]:
    """Every R in (0, 1] next to a step of int(N*R) or int(R*S), plus 1.0 and the smallest positive float."""
    points = {1.0, math.ulp(0.0)}
    for denom in (n, s):
        for k in range(1, denom + 1) if denom else ():
            x = k / denom
            for _ in range(3):
                points.add(x)
                x = math.nextafter(x, 0.0)
            x = k / denom
            for _ in range(3):
                x = math.nextafter(x, 2.0)
                points.add(x)
    return sorted(p for p in points if 0.0 < p <= 1.0)


def _check(n: int, s: int, overhead: int, t: int, candidates: list[float]) -> None:
    r = ratio_for_max_tokens(n, s, t, overhead)
    assert 0.0 < r <= 1.0
    got = _count(n, s, overhead, r)
    best = max(c for c in (_count(n, s, overhead, x) for x in candidates) if c <= t)
    assert got <= t and got == best, (n, s, overhead, t, r)
    if got == _count(n, s, overhead, 1.0):
        assert r == 1.0  # the whole image fits: left whole
    else:
        assert _count(n, s, overhead, math.nextafter(r, 2.0)) > t  # the largest R that fits
        assert got >= t - 1  # each term steps by one at a time; both at once leave at most one token unused


def test_matches_brute_force_on_many_cases():
    rng = random.Random(0)
    cases = [(576, 2304, 48), (576, 1872, 39), (729, 6561, 81), (256, 1536, 2), (16, 48, 6), (64, 0, 1),
             (64, 0, 0), (1, 1, 0), (3, 7, 0), (49, 147, 7), (100, 99, 10)]  # fmt: skip
    cases += [(rng.randint(1, 300), rng.randint(0, 1200), rng.randint(0, 40)) for _ in range(40)]
    checked = 0
    for n, s, overhead in cases:
        candidates = _candidates(n, s)
        full = overhead + n + s
        budgets = {overhead, overhead + 1, full - 1, full, full + 5, (overhead + full) // 2}
        budgets |= {rng.randint(overhead, full) for _ in range(12)}
        for t in sorted(b for b in budgets if b >= max(overhead, 1)):
            _check(n, s, overhead, t, candidates)
            checked += 1
    assert checked > 500


def test_every_budget_of_a_small_image():
    n, s, overhead = 16, 40, 5
    candidates = _candidates(n, s)
    for t in range(overhead, overhead + n + s + 3):
        _check(n, s, overhead, t, candidates)
    # the counts reached by the budgets cover every achievable count: no budget wastes a reachable token
    reached = {_count(n, s, overhead, ratio_for_max_tokens(n, s, t, overhead)) for t in range(overhead, 62)}
    assert reached == {_count(n, s, overhead, x) for x in candidates}


def test_image_under_budget_is_left_whole_and_overhead_over_budget_is_an_error():
    assert ratio_for_max_tokens(576, 2304, 576 + 2304 + 48, 48) == 1.0
    assert ratio_for_max_tokens(576, 2304, 10**6, 48) == 1.0
    r = ratio_for_max_tokens(576, 2304, 48, 48)  # only the newlines fit: no visual token
    assert budget_counts(576, 2304, r) == (0, 0)
    assert budget_counts(576, 2304, math.nextafter(r, 1.0)) != (0, 0)
    with pytest.raises(ValueError) as err:
        ratio_for_max_tokens(576, 2304, 47, 48)
    assert "max_image_tokens=47 is too small" in str(err.value) and ">= 48" in str(err.value)
    assert "\n" not in str(err.value)


def test_generic_search_on_another_monotone_count():
    # a count that is not the budget formula: ceil(50 * sqrt(R)) + 3, whose largest fitting R is checked directly
    def count(r: float) -> int:
        return math.ceil(50 * math.sqrt(r)) + 3

    for t in range(4, 60):
        r = largest_fitting_ratio(count, t)
        assert count(r) <= t
        assert r == 1.0 or count(math.nextafter(r, 2.0)) > t
    with pytest.raises(ValueError, match="gives it 4 tokens"):
        largest_fitting_ratio(count, 3)


def test_paper_example_and_config_dispatch():
    # LLaVA-NeXT 672x672 (2x2 crops of 24x24, 48 newline rows): 2928 tokens in all; "up to 288 tokens" per image
    n, s, rows = 576, 48 * 48, 48
    r = ratio_for_max_tokens(n, s, 288, rows)
    assert _count(n, s, rows, r) in (287, 288) and _count(n, s, rows, math.nextafter(r, 1.0)) > 288
    cfg = GlobalComConfig(max_image_tokens=288)
    assert cfg.ratio is None and cfg.image_ratio(n, s, rows) == r
    assert GlobalComConfig(ratio=0.3).image_ratio(n, s, rows) == 0.3  # ratio mode: R itself for every image
