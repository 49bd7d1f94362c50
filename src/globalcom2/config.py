"""`GlobalComConfig`: every option of GlobalCom², validated before anything is patched."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from .core.allocation import ALLOCATIONS
from .core.scores import SCORE_KINDS
from .core.select import MODES, SCORINGS

IMPORTANCES = ("auto", "cls", "cosine")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _check_number(name: str, value: object, allowed: str) -> float:
    """``value`` as a float; ``allowed`` (e.g. ``"in (0, 1]"``) is quoted in the one-line error message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number {allowed}, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"`{name}` must be finite and {allowed}, got {value}")
    return value


@dataclass(frozen=True)
class GlobalComConfig:
    """Options of GlobalCom² (see the README's option table).

    Args:
        ratio: R in (0, 1], the fraction of visual tokens kept (thumbnail and crops alike).
        mode: ``"budget"``: the token count depends on image size and R only, so the processor emits exactly that
            many placeholders (generate, forward, pipelines, vLLM work unchanged). ``"reference"``: per-crop counts
            int(N_j * r_j) and emission order exactly as the official implementation.
        allocation: how r_j is derived from the thumbnail (paper Table 2).
        scoring: token score inside a crop (paper Table 3): holistic (Eq. 5), local or global.
        alpha: weight of the global score in Eq. 5, in [0, 1].
        tau: softmax temperature of Eq. 3, > 0.
        score: ``"logits"`` (pre-softmax [CLS] row, official code) or ``"softmax"`` (paper Eq. 1).
        importance: ``"cls"`` ([CLS] attention), ``"cosine"`` (Eq. 7) or ``"auto"`` (cls when the tower has one).
    """

    ratio: float = 0.25
    mode: str = "budget"
    allocation: str = "softmax-sum"
    scoring: str = "holistic"
    alpha: float = 0.5
    tau: float = 10.0
    score: str = "logits"
    importance: str = "auto"

    def __post_init__(self) -> None:
        ratio = _check_number("ratio", self.ratio, "in (0, 1]")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"`ratio` must be in (0, 1], got {self.ratio!r}")
        alpha = _check_number("alpha", self.alpha, "in [0, 1]")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha!r}")
        tau = _check_number("tau", self.tau, "> 0")
        if not tau > 0.0:
            raise ValueError(f"`tau` must be > 0, got {self.tau!r}")
        _check_choice("mode", self.mode, MODES)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_choice("scoring", self.scoring, SCORINGS)
        _check_choice("score", self.score, SCORE_KINDS)
        _check_choice("importance", self.importance, IMPORTANCES)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "tau", tau)

    @classmethod
    def from_kwargs(cls, config: GlobalComConfig | None = None, **kwargs: object) -> GlobalComConfig:
        """Build from an optional base config plus keyword overrides; unknown keywords are an error."""
        if config is not None and not isinstance(config, GlobalComConfig):
            hint = (
                " (pass the ratio by name: apply(model, processor, ratio=...))"
                if isinstance(config, numbers.Real)
                else ""
            )
            raise TypeError(
                f"`config` must be a GlobalComConfig or None, got {type(config).__name__} {config!r}{hint}"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown GlobalCom² option(s) {unknown}; valid options: {sorted(names)}")
        base = asdict(config) if config is not None else {}
        base.update(kwargs)
        return cls(**base)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)
