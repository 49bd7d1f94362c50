"""Per-layer image-token schedules of the LLM-side methods (FastV, PDrop, SparseVLM) at a retention ratio R.

The paper compares multi-stage methods at an "equivalent token count" (GlobalCom² Sec. 5.1): the number of image
tokens averaged over all L layers of the LLM equals what a one-shot method keeps at R. A :class:`Schedule` says
which layers start a new pruning stage (``boundaries``: layer K_s is the first layer that sees stage s's smaller
set) and the share of an image's tokens kept from there on (``shares``); layers before K_1 see every token. Its
layer average is ``(K_1 + sum_s len_s * share_s) / L``. An image of n tokens keeps ``floor(n * share_s)`` in
stage s, so the realised average is below n*R by less than one token.

- **FastV** (Chen et al., ECCV 2024): one stage at K (default 2). ``equivalent=True`` sets its share to
  ``(R*L - K) / (L - K)`` so the average is R; ``equivalent=False`` (FastV's own K/R reading, the default of
  ``fastv``) keeps the share R from layer K on.
- **PDrop** (Xing et al., CVPR 2025, Sec. 3.2): S = 4 stages, each keeping a fraction lambda = 0.5 of the previous
  one (paper default: drops after layers 8, 16, 24 of a 32-layer LLM, i.e. shares 1/2, 1/4, 1/8; layer average
  0.46875). At another R, the first drop moves: K_1 = round(L * (R - a) / (1 - a)) with a = mean(lambda^s, s = 1..S-1)
  (clamped to [1, L - S + 1]), the layers after K_1 are split into S - 1 near-equal stages (longer stages first),
  and lambda is then solved (bisection) so the layer average is exactly R. At R = 0.46875, L = 32 this gives the
  paper's [8, 16, 24] and lambda = 0.5; for small R, K_1 reaches 1 and lambda falls.
- **SparseVLM** (Zhang et al., ICML 2025, Sec. 3): prunes after layers 2, 6 and 15 of a 32-layer LLM (its public
  code), so stages start at K = 3, 7, 16; other depths scale these layers by L/32 (rounded, kept increasing).
  Stage shares decay geometrically (rho, rho^2, rho^3) with rho solved so the layer average is R: one rule for every
  R (the public code hand-sets per-stage counts for 192/128/96/64 of 576 tokens; at 192 they are within a few
  percent of this rule).

:func:`schedule` dispatches on the method name; every function is pure (no torch) and raises ``ValueError`` when R
cannot be reached (the layers before the first drop alone exceed R*L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PDROP_LAMBDA",
    "PDROP_STAGES",
    "SPARSEVLM_LAYERS",
    "Schedule",
    "fastv_schedule",
    "layer_ratio",
    "pdrop_schedule",
    "schedule",
    "solve_decay",
    "sparsevlm_schedule",
]

PDROP_STAGES = 4
PDROP_LAMBDA = 0.5
SPARSEVLM_LAYERS = (2, 6, 15)  # pruning layers of SparseVLM's public code for 32-layer LLaVA
_REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class Schedule:
    """Which layers see how many image tokens.

    Attributes:
        num_layers: L, the LLM's depth.
        boundaries: K_1 < K_2 < ...: layer K_s is the first layer of stage s (1 <= K_s <= L - 1).
        shares: share of an image's tokens kept from layer K_s on (non-increasing, in (0, 1]).
        ratio: the R the schedule was built for.
        equivalent: True when the layer average of the shares equals R.
    """

    num_layers: int
    boundaries: tuple[int, ...]
    shares: tuple[float, ...]
    ratio: float
    equivalent: bool = True

    @property
    def layer_shares(self) -> list[float]:
        """Share of the image tokens each of the L layers sees."""
        out, stage = [], -1
        for j in range(self.num_layers):
            while stage + 1 < len(self.boundaries) and j >= self.boundaries[stage + 1]:
                stage += 1
            out.append(1.0 if stage < 0 else self.shares[stage])
        return out

    @property
    def average(self) -> float:
        """Mean share over the L layers (R when ``equivalent``)."""
        return sum(self.layer_shares) / self.num_layers

    def counts(self, num_tokens: int) -> list[int]:
        """Image tokens kept in each stage by an image of ``num_tokens`` tokens: ``floor(n * share_s)``."""
        return [int(num_tokens * s) for s in self.shares]

    def layer_counts(self, num_tokens: int) -> list[int]:
        """Image tokens each layer sees for an image of ``num_tokens`` tokens."""
        counts = self.counts(num_tokens)
        return [
            num_tokens if j < self.boundaries[0] else counts[self._stage(j)] for j in range(self.num_layers)
        ]

    def _stage(self, layer: int) -> int:
        return max(s for s, k in enumerate(self.boundaries) if k <= layer)

    def summary(self) -> dict:
        """JSON-friendly: boundaries, shares, per-layer shares and their mean."""
        return {
            "num_layers": self.num_layers,
            "boundaries": list(self.boundaries),
            "shares": [round(s, 6) for s in self.shares],
            "layer_shares": [round(s, 6) for s in self.layer_shares],
            "average": round(self.average, 6),
            "ratio": self.ratio,
            "equivalent": self.equivalent,
        }


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _check_boundaries(boundaries: Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    b = tuple(int(k) for k in boundaries)
    if (
        not b
        or any(not 1 <= k <= num_layers - 1 for k in b)
        or any(x >= y for x, y in zip(b, b[1:], strict=False))
    ):
        raise ValueError(
            f"`{what}` must be increasing layers in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {list(b)}"
        )
    return b


def _average(num_layers: int, boundaries: tuple[int, ...], shares: Sequence[float]) -> float:
    ends = (*boundaries[1:], num_layers)
    return (
        boundaries[0] + sum((e - k) * s for k, e, s in zip(boundaries, ends, shares, strict=True))
    ) / num_layers


def solve_decay(
    num_layers: int, boundaries: Sequence[int], ratio: float, method: str = "the schedule"
) -> float:
    """The decay rho in (0, 1] whose shares rho, rho^2, ... over ``boundaries`` average ``ratio`` over all layers.

    The average grows monotonically with rho (from K_1/L at rho -> 0 to 1 at rho = 1); 100 bisection steps in
    float64 fix rho to machine precision, the same on every machine.

    Raises:
        ValueError: R <= K_1 / L (the layers before the first drop alone reach R*L; the average is always above
            K_1 / L, so R must be above it).
    """
    ratio = _check_ratio(ratio)
    b = _check_boundaries(boundaries, num_layers, "layers")
    if ratio * num_layers <= b[0]:
        # every later layer keeps at least a share > 0 (rho > 0), so the average stays strictly above K_1 / L
        earlier = ", or earlier pruning layers (option `layers`)" if b[0] > 1 else ""
        raise ValueError(
            f"`ratio`={ratio:g} is out of reach for {method} on a {num_layers}-layer LLM: layers 0..{b[0] - 1} see "
            f"every image token, so the layer average is always above {b[0]}/{num_layers} = "
            f"{b[0] / num_layers:.3g}; use a ratio above {b[0] / num_layers:.3g}{earlier}"
        )

    def avg(rho: float) -> float:
        return _average(num_layers, b, [rho ** (s + 1) for s in range(len(b))])

    if avg(1.0) <= ratio:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < ratio else (lo, mid)
    return (lo + hi) / 2


def layer_ratio(ratio: float, layer: int, num_layers: int, equivalent: bool) -> float:
    """Share of image tokens FastV keeps from layer K on: R, or with ``equivalent`` (R*L - K) / (L - K)."""
    if not equivalent:
        return ratio
    r = (ratio * num_layers - layer) / (num_layers - layer)
    if r <= 0:
        raise ValueError(
            f"`ratio`={ratio} with equivalent=True needs ratio > layer/num_layers = {layer}/{num_layers}: "
            "the first K layers alone already exceed the budget (lower `layer` or use equivalent=False)"
        )
    return min(r, 1.0)


def fastv_schedule(num_layers: int, ratio: float, *, layer: int = 2, equivalent: bool = False) -> Schedule:
    """FastV: one stage from layer K (module docstring)."""
    ratio = _check_ratio(ratio)
    b = _check_boundaries((layer,), num_layers, "layer")
    return Schedule(num_layers, b, (layer_ratio(ratio, b[0], num_layers, equivalent),), ratio, equivalent)


def pdrop_schedule(
    num_layers: int, ratio: float, *, stages: int = PDROP_STAGES, lam: float = PDROP_LAMBDA,
    layers: Sequence[int] | None = None,
) -> Schedule:  # fmt: skip
    """PDrop at layer-average R (module docstring): lambda sets where the first drop falls, then is re-solved.

    Args:
        num_layers: L.
        ratio: R, the layer average of the kept share.
        stages: S >= 2, the number of stages (S - 1 drops).
        lam: lambda in (0, 1), the paper's per-stage keep fraction, used to place the first drop.
        layers: explicit drop layers K_1 < ... < K_{S-1} (then only lambda is solved; ``stages`` must match).
    """
    ratio = _check_ratio(ratio)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
        raise ValueError(f"`stages` must be an int >= 2, got {stages!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 1:
        raise ValueError(f"`lam` must be in (0, 1), got {lam!r}")
    if layers is not None:
        b = _check_boundaries(layers, num_layers, "layers")
        if len(b) != stages - 1:
            raise ValueError(f"`layers` {list(b)} gives {len(b) + 1} stages but `stages`={stages}")
    else:
        if num_layers < stages:
            raise ValueError(
                f"pdrop with {stages} stages needs at least {stages} LLM layers, got {num_layers}"
            )
        a = sum(lam**s for s in range(1, stages)) / (stages - 1)
        first = math.floor(num_layers * (ratio - a) / (1 - a) + 0.5)
        first = min(max(first, 1), num_layers - (stages - 1))
        base, extra = divmod(num_layers - first, stages - 1)
        b = (first,)
        for i in range(stages - 2):
            b += (b[-1] + base + (i < extra),)
    rho = solve_decay(num_layers, b, ratio, "pdrop")
    return Schedule(num_layers, b, tuple(rho ** (s + 1) for s in range(len(b))), ratio)


def sparsevlm_layers(num_layers: int, layers: Sequence[int] = SPARSEVLM_LAYERS) -> tuple[int, ...]:
    """SparseVLM's pruning layers (32-layer LLaVA) scaled to ``num_layers``, rounded half up and kept increasing."""
    out: list[int] = []
    for layer in layers:
        scaled = math.floor(layer * num_layers / _REFERENCE_DEPTH + 0.5)
        out.append(max(scaled, out[-1] + 1) if out else scaled)
    return tuple(out)


def sparsevlm_schedule(num_layers: int, ratio: float, *, layers: Sequence[int] | None = None) -> Schedule:
    """SparseVLM at layer-average R (module docstring).

    Args:
        num_layers: L.
        ratio: R.
        layers: the pruning layers l_s (the attention of layer l_s rates the tokens; layers > l_s see the pruned
            set, so the stage boundaries are l_s + 1). Default: (2, 6, 15) scaled to L.
    """
    ratio = _check_ratio(ratio)
    pruning = tuple(layers) if layers is not None else sparsevlm_layers(num_layers)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in pruning):
        raise ValueError(f"`layers` must be ints, got {list(pruning)}")
    b = _check_boundaries([v + 1 for v in pruning], num_layers, "layers (+1)")
    rho = solve_decay(num_layers, b, ratio, "sparsevlm")
    return Schedule(num_layers, b, tuple(rho ** (s + 1) for s in range(len(b))), ratio)


def schedule(method: str, num_layers: int, ratio: float, **options: object) -> Schedule:
    """The schedule of ``method`` ("fastv", "pdrop", "sparsevlm") on an L-layer LLM at R (module docstring)."""
    builders = {"fastv": fastv_schedule, "pdrop": pdrop_schedule, "sparsevlm": sparsevlm_schedule}
    if method not in builders:
        raise ValueError(f"`method` must be one of {sorted(builders)}, got {method!r}")
    return builders[method](num_layers, ratio, **options)  # type: ignore[operator]
