"""What every ``globalcom2`` subcommand shares: the user-facing error class and the option parsers.

:mod:`globalcom2.cli` and the subcommands registered beside their features (:mod:`globalcom2.bench.cli`,
:mod:`globalcom2.evaluation.cli`) import it; it imports none of them, so there is no import cycle, and
:class:`CLIError` is one class even under ``python -m globalcom2.cli`` (where ``cli.py`` runs as ``__main__``).
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import ALLOCATIONS, IMPORTANCES, MODES, SCORE_KINDS, SCORINGS

__all__ = ["CLIError", "add_method_options", "method_options", "parse_ratio", "parse_ratios"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def parse_ratio(text: str) -> float:
    """argparse type: a retention ratio in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {text}")
    return value


def parse_ratios(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated retention ratios, e.g. ``0.5,0.25,0.1``."""
    return tuple(parse_ratio(t) for t in text.split(",") if t.strip())


def add_method_options(p: argparse.ArgumentParser) -> None:
    """The GlobalCom² options shared by every subcommand that compresses."""
    p.add_argument("--mode", choices=MODES, default="budget")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="softmax-sum")
    p.add_argument("--scoring", choices=SCORINGS, default="holistic")
    p.add_argument("--score", choices=SCORE_KINDS, default="logits")
    p.add_argument("--importance", choices=IMPORTANCES, default="auto")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=10.0)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed :func:`add_method_options` as keyword arguments for ``globalcom2.apply``."""
    keys = ("mode", "allocation", "scoring", "score", "importance", "alpha", "tau")
    return {k: getattr(args, k) for k in keys}
