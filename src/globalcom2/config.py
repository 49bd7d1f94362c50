"""`GlobalComConfig`: every option of GlobalCom², validated before anything is patched."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from .core.allocation import ALLOCATIONS
from .core.budget import ratio_for_max_tokens
from .core.scores import SCORE_KINDS
from .core.select import MODES, SCORINGS

IMPORTANCES = ("auto", "cls", "cosine")
DEFAULT_RATIO = 0.25


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

    Exactly one budget is used: ``ratio`` (default 0.25) or ``max_image_tokens``. Passing both is an error; with
    ``max_image_tokens`` the stored ``ratio`` is None and every image gets its own R (:meth:`image_ratio`).

    Args:
        ratio: R in (0, 1], the fraction of visual tokens kept (thumbnail and crops alike). None (the default)
            means 0.25 unless ``max_image_tokens`` is given.
        mode: ``"budget"``: the token count depends on image size and R only, so the processor emits exactly that
            many placeholders (generate, forward, pipelines, vLLM work unchanged). ``"reference"``: per-crop counts
            int(N_j * r_j) and emission order exactly as the official implementation.
        allocation: how r_j is derived from the thumbnail (paper Table 2).
        scoring: token score inside a crop (paper Table 3): holistic (Eq. 5), local or global.
        alpha: weight of the global score in Eq. 5, in [0, 1].
        tau: softmax temperature of Eq. 3, > 0.
        score: ``"logits"`` (pre-softmax [CLS] row, official code) or ``"softmax"`` (paper Eq. 1).
        importance: ``"cls"`` ([CLS] attention), ``"cosine"`` (Eq. 7) or ``"auto"`` (cls when the tower has one).
        max_image_tokens: T, a positive int (budget mode only): every image hands at most T tokens to the LLM
            (layout tokens such as newlines and image markers included) at the largest R that fits, a pure
            function of the image size and T (:func:`~globalcom2.core.budget.ratio_for_max_tokens`); images
            whose full count fits are left whole.
        region_tokens: G, native-resolution families only (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): the image's
            merged-token grid is cut into regions of at most G x G tokens and its global view pooled to at most
            G x G cells (:mod:`globalcom2.core.regions`); None means 16 (a 448 px tile of Qwen2/2.5-VL, 512 px of
            Qwen3-VL). Ignored by the tiled families.
    """

    ratio: float | None = None
    mode: str = "budget"
    allocation: str = "softmax-sum"
    scoring: str = "holistic"
    alpha: float = 0.5
    tau: float = 10.0
    score: str = "logits"
    importance: str = "auto"
    max_image_tokens: int | None = None
    region_tokens: int | None = None

    def __post_init__(self) -> None:
        ratio: float | None = None
        if self.max_image_tokens is None:
            ratio = _check_number("ratio", DEFAULT_RATIO if self.ratio is None else self.ratio, "in (0, 1]")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"`ratio` must be in (0, 1], got {self.ratio!r}")
        else:
            tokens = self.max_image_tokens
            if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral):
                raise TypeError(
                    f"`max_image_tokens` must be a positive int, got {type(tokens).__name__} {tokens!r}"
                )
            if tokens <= 0:
                raise ValueError(f"`max_image_tokens` must be a positive int, got {tokens}")
            if self.ratio is not None:
                raise ValueError(
                    f"pass either `ratio` or `max_image_tokens`, not both (got ratio={self.ratio!r}, "
                    f"max_image_tokens={tokens})"
                )
            if self.mode != "budget":
                raise ValueError(
                    f"`max_image_tokens` needs mode='budget' (got mode={self.mode!r}): reference mode's per-crop "
                    "counts depend on the scores, so no count is known before the forward"
                )
            object.__setattr__(self, "max_image_tokens", int(tokens))
        region = self.region_tokens
        if region is not None and (
            isinstance(region, bool) or not isinstance(region, numbers.Integral) or region < 1
        ):
            raise ValueError(
                f"`region_tokens` must be a positive int (merged tokens per region side), got {region!r}"
            )
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
        """Build from an optional base config plus keyword overrides; unknown keywords are an error.

        ``ratio=None`` / ``max_image_tokens=None`` mean "not given". Either budget given here replaces the base
        config's budget; both given here (not None) is a ValueError.
        """
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
        # None means "not given"; a budget given here replaces the base config's other one (both here: an error).
        kwargs = {k: v for k, v in kwargs.items() if not (k in ("ratio", "max_image_tokens") and v is None)}
        if kwargs.get("max_image_tokens") is not None and "ratio" not in kwargs:
            base["ratio"] = None
        if kwargs.get("ratio") is not None and "max_image_tokens" not in kwargs:
            base["max_image_tokens"] = None
        base.update(kwargs)
        return cls(**base)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def budget_label(self) -> str:
        """The budget for messages: ``"ratio=0.25"`` or ``"max_image_tokens=300"``."""
        if self.max_image_tokens is not None:
            return f"max_image_tokens={self.max_image_tokens}"
        return f"ratio={self.ratio}"

    @property
    def selection_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~globalcom2.core.select.select_images` this config sets."""
        return {
            "mode": self.mode, "allocation": self.allocation, "scoring": self.scoring, "alpha": self.alpha,
            "tau": self.tau,
        }  # fmt: skip

    def image_ratio(self, num_thumbnail_tokens: int, num_crop_tokens: int, overhead: int = 0) -> float:
        """R for one image of N thumbnail tokens, S crop tokens and ``overhead`` layout tokens (paper Eq. 2-6 run at it).

        ``ratio`` itself, or under ``max_image_tokens`` the largest R whose budget-mode count fits T
        (:func:`~globalcom2.core.budget.ratio_for_max_tokens`). Every family's count and selection call this, so
        the processor's count and the features agree.
        """
        if self.max_image_tokens is None:
            assert self.ratio is not None  # set by __post_init__
            return self.ratio
        return ratio_for_max_tokens(num_thumbnail_tokens, num_crop_tokens, self.max_image_tokens, overhead)
