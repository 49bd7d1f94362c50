"""`globalcom2 eval`: registered by :func:`globalcom2.cli.build_parser` through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from typing import Any

from ..cli_common import parse_ratios
from ..demo.tiny_families import FAMILIES as STANDIN_FAMILIES
from ..demo.tiny_families import RANDOM_TOWER_FAMILIES
from ..methods import available_methods


def cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "defects":
        return _cmd_defects(args)
    from .runner import run_eval, run_family_eval

    photos = tuple(p.strip() for p in args.photos.split(",") if p.strip()) if args.photos else None
    log = (lambda *_: None) if args.json else print
    run = run_eval if args.family == "llava_next" else functools.partial(run_family_eval, family=args.family)
    result = run(
        args.out, photos=photos, ratios=args.ratios or (0.5, 0.25, 0.1), quick=args.quick, llm=not args.no_llm,
        progress=not args.no_progress, log=log, command="globalcom2 " + shlex.join(sys.argv[1:]),
    )  # fmt: skip
    if args.json:
        print(json.dumps({k: result[k] for k in ("files", "seconds", "ratios", "photos")}, indent=2))
    return 0


def _cmd_defects(args: argparse.Namespace) -> int:
    from .defects import run_defects

    sizes: dict[str, Any] = {"num_train": 4, "num_test": 4, "layouts": ((2, 2),)} if args.quick else {}
    for key in ("num_train", "num_test"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    result = run_defects(
        args.out, ratios=args.ratios or (0.5, 0.25, 0.1, 0.05), progress=not args.no_progress,
        log=(lambda *_: None) if args.json else print, command="globalcom2 " + shlex.join(sys.argv[1:]), **sizes,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"files": result["files"], "seconds": result["meta"]["seconds"],
                          "fingerprint": result["meta"]["fingerprint"]}, indent=2))  # fmt: skip
    return 0


def register(subparsers) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help="every method x R and the paper's ablations on real photos (DINOv2 stand-in; fidelity, not accuracy)",
        description="Compare the compression methods and the paper's ablations (Tables 2-3) at several R on the "
        "shipped photos with the offline DINOv2 stand-in tower: how well the kept tokens cover what the encoder "
        "finds important (fidelity metrics), written as CSV, Markdown and plots. No VQA accuracy: that needs real "
        "weights (use the lmms-eval plugin). `--task defects`: a labelled test instead, small defects in textile "
        "mosaics found by a nearest-neighbour detector on the tokens each method keeps (docs/eval.md).",
    )
    p.add_argument("--task", choices=("photos", "defects"), default="photos",
                   help="photos: fidelity sweep on the shipped photos; defects: small-defect detection in textile "
                   "mosaics (needs globalcom2[defects]; docs/eval.md)")  # fmt: skip
    p.add_argument("--out", default="globalcom2_eval_out", help="output folder (CSV, Markdown, plots)")
    p.add_argument("--photos", default=None, help="comma-separated shipped photos (default: all)")
    p.add_argument("--ratios", type=parse_ratios, default=None,
                   help="comma-separated retention ratios R in (0, 1] (default: 0.5,0.25,0.1; defects: "
                   "0.5,0.25,0.1,0.05)")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="one photo, two ablation settings, for tests and smoke checks (about 2 min on 2 CPU cores); "
        "defects: 4 training + 3 x 4 test mosaics (about 1 min)",
    )
    p.add_argument(
        "--num-train", type=int, default=None, help="defects: nominal training mosaics (default 24)"
    )
    p.add_argument("--num-test", type=int, default=None, help="defects: test mosaics per class (default 40)")
    p.add_argument("--family", choices=STANDIN_FAMILIES, default="llava_next",
                   help="photos: the stand-in family (every registered one); every method it runs (README's method "
                   f"table) of {', '.join(available_methods())} is compared. {', '.join(RANDOM_TOWER_FAMILIES)}: "
                   "no stand-in fits their tower class, so theirs is RANDOM and the numbers measure agreement with "
                   "the uncompressed random model, not what a trained encoder finds important")  # fmt: skip
    p.add_argument("--no-llm", action="store_true", help="skip the LLM-side methods (tiny random LLM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true", help="print the written files as JSON (and nothing else) on stdout"
    )
    p.set_defaults(func=cmd_eval)
