"""The numbers a kept-token figure states, and the words it states them in: one function of the `Plan`.

Figures (:mod:`globalcom2.viz.overlay`) and JSON summaries (``globalcom2 visualize --json``, the demo's
``summary.json``) both derive their counts from :func:`panel_numbers`, so a figure and its JSON cannot disagree.
The words follow what the method does with the tokens:

- selection methods (GlobalCom², FasterVLM-style, random) **keep** some tokens and drop the rest;
- pooling **averages** every tile into fewer tokens and drops nothing (a
  :class:`~globalcom2.methods.vision.PoolingPlan`), so "kept 576/576" would be wrong: its panels say "576 tokens
  averaged into 64";
- FastV (and GlobalCom² + FastV) hand every token to the LLM and prune inside it: their counts are the tokens that
  reach the layers after the pruning layer;
- PruMerge(+) **merges**: it keeps some tokens, each carrying its key-nearest neighbours, and may hand on one more
  token per tile made of the pruned rest (a :class:`~globalcom2.methods.prumerge.PruMergePlan`): its panels say
  "kept 12 of 64 tokens, the other 52 merged into them" and its token line counts those "merged remainders".

Ratios are printed by :func:`format_ratio`, one rounding rule for every label.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from globalcom2.core.plan import Plan

__all__ = ["PanelNumbers", "PanelText", "figure_summary", "format_ratio", "panel_numbers", "panel_text"]

KEPT = "kept"
AVERAGED = "averaged"
MERGED = "merged"


def format_ratio(value: float, places: int = 3) -> str:
    """``value`` with ``places`` decimals, halves rounded up: 0.075 -> "0.075", 0.4375 -> "0.438" (at 2: "0.08").

    Ratios arrive as float32 (0.175 is stored as 0.17499999...), so the value is first rounded to 6 decimals
    (removing float noise), then to ``places`` decimals with ROUND_HALF_UP: a ratio that is a decimal half at
    ``places`` always rounds up, whichever side of it its binary value fell.
    """
    exact = Decimal(float(value)).quantize(Decimal("1e-6"), rounding=ROUND_HALF_EVEN)
    return str(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class PanelNumbers:
    """Every count one kept-token panel states (see :func:`panel_numbers`).

    Attributes:
        grid: ``(rows, cols)`` of crops; ``(0, 0)`` for a single-tile image.
        reduction: ``"kept"`` (a selection: tokens kept, the rest dropped), ``"averaged"`` (pooling) or
            ``"merged"`` (PruMerge: tokens kept, the rest merged into them).
        stage: ``"vision"`` (tokens reduced before the LLM) or ``"llm"`` (FastV: pruned inside the LLM; the counts
            are the tokens that reach the layers after the pruning layer).
        num_tokens: image tokens handed on (see ``stage``), newlines included.
        num_tokens_full: the same count without compression.
        thumbnail_tokens: thumbnail tokens handed on.
        thumbnail_cells: thumbnail tokens before compression (g*g).
        crop_tokens: per crop, tokens handed on (kept, or pooled tokens).
        crop_cells: per crop, its valid tokens N_j before compression.
        crop_ratios: per crop, the plan's r_j (pooling: pooled / valid tokens).
        extra_tokens: tokens handed on that sit in no cell (PruMerge's merged remainder of each tile), else 0.
    """

    grid: tuple[int, int]
    reduction: str
    stage: str
    num_tokens: int
    num_tokens_full: int
    thumbnail_tokens: int
    thumbnail_cells: int
    crop_tokens: tuple[int, ...]
    crop_cells: tuple[int, ...]
    crop_ratios: tuple[float, ...]
    extra_tokens: int = 0

    @property
    def crops_tokens(self) -> int:
        return sum(self.crop_tokens)

    @property
    def crops_cells(self) -> int:
        return sum(self.crop_cells)

    @property
    def newline_tokens(self) -> int:
        """Layout tokens handed on besides thumbnail and crops (LLaVA's newline per row; 0 for InternVL)."""
        return self.num_tokens - self.thumbnail_tokens - self.crops_tokens - self.extra_tokens

    def summary(self) -> dict[str, Any]:
        """The JSON form: exactly the numbers :func:`panel_text` prints."""
        return {
            "reduction": self.reduction,
            "stage": self.stage,
            "num_tokens": self.num_tokens,
            "num_tokens_full": self.num_tokens_full,
            "thumbnail_tokens": self.thumbnail_tokens,
            "thumbnail_cells": self.thumbnail_cells,
            "crops_tokens": self.crops_tokens,
            "crops_cells": self.crops_cells,
            "newline_tokens": self.newline_tokens,
            "extra_tokens": self.extra_tokens,
            "crop_tokens": list(self.crop_tokens),
            "crop_cells": list(self.crop_cells),
            "crop_ratios": [round(r, 6) for r in self.crop_ratios],
        }


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _valid_box(plan: Plan) -> tuple[int, int, int, int]:
    rows, cols = plan.grid
    g = plan.patches_per_side
    top, bottom, left, right = (int(v) for v in plan.valid_box)
    if bottom <= top or right <= left:  # not recorded: the whole padded grid
        return 0, rows * g, 0, cols * g
    return top, bottom, left, right


def _is_pooling(plan: Plan) -> bool:
    from ..methods.vision import PoolingPlan

    return isinstance(plan, PoolingPlan)


def _merged_extra(plan: Plan) -> int | None:
    """Merged-remainder tokens of a PruMerge plan; None for any other plan."""
    from ..methods.prumerge import PruMergePlan

    return int(plan.extra_tokens) if isinstance(plan, PruMergePlan) else None


def panel_numbers(plan: Plan) -> PanelNumbers:
    """The counts of one plan's figure and JSON summary: THE function both derive from.

    Per-crop counts are the plan's ``crop_keep_counts`` / ``crop_valid_counts`` (tokens, also where a family's
    LLM grid is not the patch grid); a hand-made plan without them is counted from its masks and valid box.
    """
    g = plan.patches_per_side
    rows, cols = plan.grid
    n = rows * cols
    pooling = _is_pooling(plan)
    merged_extra = _merged_extra(plan)
    if pooling:  # every cell is averaged into one pooled token: count the pooled tokens, not the cells
        cover = _to_numpy(plan.thumbnail_cover)  # type: ignore[attr-defined]
        thumbnail_tokens = int(cover.max()) + 1 if cover.size else 0
    else:
        thumbnail_tokens = int(_to_numpy(plan.thumbnail_mask).sum())
    kept = _to_numpy(plan.crop_keep_counts).reshape(-1)
    valid = _to_numpy(plan.crop_valid_counts).reshape(-1)
    ratios = _to_numpy(plan.crop_ratios).astype(float).reshape(-1)
    if n and (kept.size != n or valid.size != n):  # a hand-made plan: count on the masks
        mask = _to_numpy(plan.crops_mask).astype(bool)
        vt, vb, vl, vr = _valid_box(plan)
        inside = np.zeros((rows * g, cols * g), dtype=bool)
        inside[vt:vb, vl:vr] = True
        tiles = [
            (slice(r * g, (r + 1) * g), slice(c * g, (c + 1) * g)) for r in range(rows) for c in range(cols)
        ]
        kept = np.array([int(mask[t].sum()) for t in tiles]) if kept.size != n else kept
        valid = np.array([int(inside[t].sum()) for t in tiles]) if valid.size != n else valid
    if ratios.size != n:
        ratios = np.array([k / max(v, 1) for k, v in zip(kept, valid, strict=True)], dtype=float)
    return PanelNumbers(
        grid=(rows, cols),
        reduction=AVERAGED if pooling else KEPT if merged_extra is None else MERGED,
        stage="llm" if plan.mode == "fastv" or plan.layer_tokens is not None else "vision",
        num_tokens=int(plan.num_tokens),
        num_tokens_full=int(plan.num_tokens_full),
        thumbnail_tokens=thumbnail_tokens,
        thumbnail_cells=g * g,
        crop_tokens=tuple(int(k) for k in kept[:n]),
        crop_cells=tuple(int(v) for v in valid[:n]),
        crop_ratios=tuple(float(r) for r in ratios[:n]),
        extra_tokens=merged_extra or 0,
    )


@dataclass(frozen=True)
class PanelText:
    """The words of one panel: the token line, the two panel headers and one label per crop (row-major)."""

    token_line: str
    thumbnail_header: str
    crops_header: str
    crop_labels: tuple[str, ...]


def panel_text(numbers: PanelNumbers) -> PanelText:
    """What a panel says about ``numbers`` (from :func:`panel_numbers`), in words that fit the method.

    - kept: ``thumbnail: kept 57 of 576 tokens``; crop label ``r_1 = 0.075`` / ``kept 43/576``;
    - averaged (pooling): ``thumbnail: 576 tokens averaged into 64``; crop label ``averaged`` / ``576 → 64``;
    - merged (PruMerge): ``thumbnail: kept 12 of 576 tokens, the other 564 merged into them``; the token line adds
      ``merged remainders N`` (one token per tile made of its pruned rest);
    - FastV: the token line counts the tokens in the LLM's layers after pruning.
    """
    nb = numbers
    pct = 100.0 * nb.num_tokens / max(nb.num_tokens_full, 1)
    where = "image tokens in the LLM after pruning" if nb.stage == "llm" else "image tokens to the LLM"
    parts = [f"thumbnail {nb.thumbnail_tokens}"]
    if nb.crop_tokens:
        parts.append(f"crops {nb.crops_tokens}")
    if nb.newline_tokens:
        parts.append(f"newlines {nb.newline_tokens}")
    if nb.extra_tokens:
        parts.append(f"merged remainders {nb.extra_tokens}")
    token_line = f"{where}: {nb.num_tokens} of {nb.num_tokens_full} ({pct:.1f} %) = " + " + ".join(parts)
    rows, cols = nb.grid
    if nb.reduction == AVERAGED:
        thumb = f"thumbnail: {nb.thumbnail_cells} tokens averaged into {nb.thumbnail_tokens}"
        crops = f"crops {rows}x{cols}: {nb.crops_cells} tokens averaged into {nb.crops_tokens}"
        labels = tuple(f"averaged\n{v} → {k}" for k, v in zip(nb.crop_tokens, nb.crop_cells, strict=True))
    else:
        thumb = f"thumbnail: kept {nb.thumbnail_tokens} of {nb.thumbnail_cells} tokens"
        crops = f"crops {rows}x{cols}: kept {nb.crops_tokens} of {nb.crops_cells} tokens"
        if nb.reduction == MERGED:
            thumb += f", the other {nb.thumbnail_cells - nb.thumbnail_tokens} merged into them"
            crops += f", the other {nb.crops_cells - nb.crops_tokens} merged into them"
        labels = tuple(
            f"$r_{{{j + 1}}}$ = {format_ratio(r)}\nkept {k}/{v}"
            for j, (r, k, v) in enumerate(zip(nb.crop_ratios, nb.crop_tokens, nb.crop_cells, strict=True))
        )
    return PanelText(token_line, thumb, crops if nb.crop_tokens else "", labels)


def figure_summary(plan: Plan) -> dict[str, Any]:
    """JSON summary of a plan whose counts are exactly those of its figure.

    :meth:`Plan.summary` plus :meth:`PanelNumbers.summary` (the latter wins). For a selection, ``thumbnail_kept``
    / ``crops_kept`` / ``crop_keep_counts`` equal ``thumbnail_tokens`` / ``crops_tokens`` / ``crop_tokens``;
    pooling keeps nothing in that sense (it averages), so there they are ``None``.
    """
    numbers = panel_numbers(plan)
    out = plan.summary()
    out.update(numbers.summary())
    if numbers.reduction in (KEPT, MERGED):
        out["thumbnail_kept"] = numbers.thumbnail_tokens
        out["crops_kept"] = numbers.crops_tokens
        out["crop_keep_counts"] = list(numbers.crop_tokens)
    else:
        out["thumbnail_kept"] = out["crops_kept"] = out["crop_keep_counts"] = None
    out["crop_valid_counts"] = list(numbers.crop_cells)
    return out
