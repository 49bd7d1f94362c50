"""The numbers behind the adaptive allocation (paper Eq. 2-4) on real photos: S_j, their gaps against tau, sigma, r_j.

Used by ``scripts/allocation_numbers.py`` and docs/allocation.md to show why, with the official code's scores
(pre-softmax [CLS] logits, ``score="logits"``), sigma = softmax(S / tau) is almost one-hot at tau = 10, while with
the paper's Eq. 1 (attention probabilities, ``score="softmax"``) it is almost uniform.

For every photo and score kind the tower runs once (:func:`globalcom2.evaluation.runner.photo_data`: the [CLS] row of
the last layer from that layer's input, as the adapters' scoring hook computes it); S_j, sigma and r_j are then
computed step by step with :mod:`globalcom2.core.allocation`, and r_j is checked against the ``crop_ratios`` of the
`Plan` that :func:`globalcom2.workflows.plan_for_image` returns for the same photo and options.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.allocation import crop_richness, ratios_from_sigma, softmax_sigma
from ..core.layout import thumbnail_region_map
from ..core.scores import SCORE_KINDS


@dataclass(frozen=True)
class AllocationNumbers:
    """Eq. 2-4 for one photo and one score kind.

    Attributes:
        photo: name of the photo.
        grid: ``(rows, cols)`` of crops.
        score: ``"logits"`` or ``"softmax"``.
        token_range: ``(min, max)`` of the thumbnail's token scores.
        richness: S_j per crop (Eq. 2: sum of the thumbnail scores in the crop's region), row-major.
        sigma: sigma_j = softmax(S / tau)_j (Eq. 3).
        ratios: r_j = min(1, R (1 + sigma_j - 1/n)) (Eq. 4).
        plan_ratios: the ``crop_ratios`` of the library's `Plan` for the same photo, R, tau and score.
        ratio: R.
        tau: tau.
    """

    photo: str
    grid: tuple[int, int]
    score: str
    token_range: tuple[float, float]
    richness: tuple[float, ...]
    sigma: tuple[float, ...]
    ratios: tuple[float, ...]
    plan_ratios: tuple[float, ...]
    ratio: float
    tau: float

    @property
    def gap(self) -> float:
        """S_(1) - S_(2): how far the richest crop is ahead of the next (the gap that decides sigma's top entry)."""
        top = sorted(self.richness, reverse=True)
        return top[0] - top[1] if len(top) > 1 else 0.0

    @property
    def spread(self) -> float:
        """max S - min S."""
        return max(self.richness) - min(self.richness)


@torch.no_grad()
def allocation_numbers(
    model: Any,
    processor: Any,
    photos: Iterable[tuple[str, Any]],
    *,
    ratio: float = 0.1,
    tau: float = 10.0,
    scores: Iterable[str] = SCORE_KINDS,
) -> list[AllocationNumbers]:
    """Eq. 2-4 step by step for every ``(name, image)`` of ``photos`` and every score kind (LLaVA-NeXT models).

    Single-tile images (no crops) are skipped.
    """
    from ..workflows import plan_for_image
    from .runner import photo_data

    scores = tuple(scores)
    out = []
    for name, image in photos:
        data = photo_data(model, processor, name, image)
        rows, cols = data.grid
        n = rows * cols
        if n == 0:
            continue
        regions = thumbnail_region_map(data.g, rows, cols)
        for kind in scores:
            thumb = data.scores[kind][0].float()
            richness = crop_richness(thumb, regions, n, "sum")
            sigma = softmax_sigma(richness, tau)
            ratios = ratios_from_sigma(sigma, ratio)
            plan = plan_for_image(model, processor, image, ratio=ratio, tau=tau, score=kind)
            out.append(
                AllocationNumbers(
                    photo=name,
                    grid=(rows, cols),
                    score=kind,
                    token_range=(float(thumb.min()), float(thumb.max())),
                    richness=tuple(richness.tolist()),
                    sigma=tuple(sigma.tolist()),
                    ratios=tuple(ratios.tolist()),
                    plan_ratios=tuple(float(r) for r in plan.crop_ratios),
                    ratio=ratio,
                    tau=tau,
                )
            )
    return out


def _num(value: float) -> str:
    """4 significant digits, never scientific for the magnitudes of this table."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def markdown_table(rows: list[AllocationNumbers]) -> str:
    """One Markdown row per photo and score kind: S_j, the gap S_(1) - S_(2) and gap / tau, sigma_j, r_j."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"| photo | grid | score | token scores (min–max) | S_j | S_(1) − S_(2) | ÷ τ (τ = {r0.tau:g}) | σ_j "
        f"| r_j (R = {r0.ratio:g}) | = plan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = all(abs(a - b) <= 1e-6 for a, b in zip(row.ratios, row.plan_ratios, strict=True))
        lines.append(
            f"| {row.photo} | {row.grid[0]}×{row.grid[1]} | {row.score} "
            f"| {_num(row.token_range[0])}–{_num(row.token_range[1])} "
            f"| {', '.join(_num(s) for s in row.richness)} | {_num(row.gap)} | {_num(row.gap / row.tau)} "
            f"| {', '.join(f'{s:.4f}' for s in row.sigma)} | {', '.join(f'{r:.4f}' for r in row.ratios)} "
            f"| {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines)
