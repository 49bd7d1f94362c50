"""What every ``globalcom2`` subcommand shares: the user-facing error class, the argument parser and help
formatter, the option parsers, and the guard that keeps ``--json`` output pure.

:mod:`globalcom2.cli` and the subcommands registered beside their features (:mod:`globalcom2.bench.cli`,
:mod:`globalcom2.evaluation.cli`) import it; it imports none of them, so there is no import cycle, and
:class:`CLIError` is one class even under ``python -m globalcom2.cli`` (where ``cli.py`` runs as ``__main__``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from .config import ALLOCATIONS, IMPORTANCES, MODES, SCORE_KINDS, SCORINGS

__all__ = ["CLIError", "CLIParser", "HelpFormatter", "add_budget_options", "add_method_options", "budget_options",
           "json_only_stdout", "method_options", "parse_max_image_tokens", "parse_ratio", "parse_ratios"]  # fmt: skip


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default after its help, as ``(default: ...)``.

    Left out where it says nothing: flags (off unless given), required options, ``None`` defaults (their help says
    what happens instead) and help that already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.required
            or default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or "default" in text
        ):
            return text
        if isinstance(default, (tuple, list)):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CLIParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, with a pointer to ``--help``, exit 2.

    ``globalcom2: error: argument --ratio: ratio must be in (0, 1], got 1.5 (see globalcom2 ask --help)``.
    Subcommand parsers are of the same class (``add_subparsers`` uses the parent's class).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # blame the subcommand that was given, so the hint points at its --help
            target: argparse.ArgumentParser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    target = action.choices.get(getattr(parsed, action.dest, None) or "", self)
            target.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        first = " ".join(message.split())  # argparse messages are one line, but never print two
        self.exit(2, f"globalcom2: error: {first} (see {self.prog} --help)\n")


@contextmanager
def json_only_stdout() -> Iterator[None]:
    """Keep the process's standard output for the JSON a command prints with ``print`` / ``sys.stdout``.

    While active, file descriptor 1 points at stderr, so that anything written to it underneath Python (native
    progress bars and messages of Rust / C libraries) lands on stderr; ``sys.stdout`` is a new stream on the real
    standard output. Python-level progress bars, notes and warnings already go to stderr. Where ``sys.stdout`` or
    ``sys.stderr`` is not a real file (captured in tests), nothing is changed.
    """
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        out_fd = err_fd = -1
    if out_fd < 0 or out_fd == err_fd:
        yield
        return
    original = sys.stdout
    original.flush()
    saved = os.dup(out_fd)
    try:
        os.dup2(err_fd, out_fd)
        stream = open(
            saved, "w", encoding=original.encoding or "utf-8", errors=original.errors, closefd=False
        )
        sys.stdout = stream
        try:
            yield
        finally:
            stream.flush()
            sys.stdout = original
            stream.close()
            sys.stderr.flush()
            os.dup2(saved, out_fd)
    finally:
        os.close(saved)


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
    ratios = tuple(parse_ratio(t) for t in text.split(",") if t.strip())
    if not ratios:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ratios in (0, 1], e.g. 0.5,0.25,0.1; got {text!r}"
        )
    return ratios


def parse_positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (rounds, layers, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_max_image_tokens(text: str) -> int:
    """argparse type: a per-image token budget T, a positive int."""
    try:
        value = int(text)
    except ValueError:
        message = f"max image tokens must be a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"max image tokens must be a positive integer, got {text}")
    return value


def add_budget_options(
    p: argparse.ArgumentParser, *, required: bool = False, ratio_default: float | None = None
) -> argparse._MutuallyExclusiveGroup:
    """``--ratio R`` or ``--max-image-tokens T`` (one of them; returned so a command can add e.g. ``--ratios``)."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--ratio", type=parse_ratio, default=ratio_default, help="retention ratio R in (0, 1]")
    group.add_argument("--max-image-tokens", type=parse_max_image_tokens, default=None, metavar="T",
                       help="instead of --ratio: at most T tokens per image reach the LLM (newlines and image "
                       "markers included), at the largest R that fits; smaller images are left whole")  # fmt: skip
    return group


def budget_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed :func:`add_budget_options` as keyword arguments (``ratio`` is None under ``--max-image-tokens``)."""
    tokens = getattr(args, "max_image_tokens", None)
    return {"ratio": None if tokens is not None else args.ratio, "max_image_tokens": tokens}


def add_method_options(p: argparse.ArgumentParser) -> None:
    """The GlobalCom² options shared by every subcommand that compresses."""
    p.add_argument("--mode", choices=MODES, default="budget",
                   help="budget: the token count is known before the forward (generate, pipelines, vLLM); "
                   "reference: the official implementation's per-crop counts and token order")  # fmt: skip
    p.add_argument("--allocation", choices=ALLOCATIONS, default="softmax-sum",
                   help="how the crops' retention ratios r_j are set (paper Table 2)")  # fmt: skip
    p.add_argument("--scoring", choices=SCORINGS, default="holistic",
                   help="token score inside a crop: own [CLS] score, thumbnail score, or both (paper Table 3)")  # fmt: skip
    p.add_argument("--score", choices=SCORE_KINDS, default="logits",
                   help="[CLS] attention before softmax (official code) or after it (paper Eq. 1)")  # fmt: skip
    p.add_argument("--importance", choices=IMPORTANCES, default="auto",
                   help="token importance: [CLS] attention, or minus the cosine to the tile mean (Eq. 7); "
                   "auto = cls when the vision tower has a [CLS] token")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the global (thumbnail) score in the holistic score (Eq. 5)")  # fmt: skip
    p.add_argument("--tau", type=float, default=10.0,
                   help="softmax temperature of the crop allocation (Eq. 3)")  # fmt: skip


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed :func:`add_method_options` as keyword arguments for ``globalcom2.apply``."""
    keys = ("mode", "allocation", "scoring", "score", "importance", "alpha", "tau")
    return {k: getattr(args, k) for k in keys}


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` picks CUDA when available; anything else is checked (a bad one is a CLIError)."""
    import torch

    from .loading import check_device

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return check_device(name)
    except ValueError as err:
        raise CLIError(str(err)) from None


def write_json(path: str, data: Any) -> None:
    """``--json PATH``: write ``data`` (parent folders made) and say so on stdout."""
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
