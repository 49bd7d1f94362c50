"""`globalcom2 explore`: registered by :func:`globalcom2.cli.build_parser` through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys

from ..cli_common import CLIError


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer in 1..65535, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {text}")
    return value


def cmd_explore(args: argparse.Namespace) -> int:
    from ..extras import optional_imports

    with optional_imports("globalcom2 explore"):
        import gradio  # noqa: F401  (fails here, with the pip command, before the model loads)
    from .explore import Explorer
    from .ui import launch

    explorer = Explorer(args.model, family=args.family, dtype=args.dtype, device=args.device)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        explorer.load()
    except ValueError as err:  # ModelLoadError and bad dtype/device: one line
        raise CLIError(str(err)) from err
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: serving on {args.host}: anyone who can reach this address can use the app",
              file=sys.stderr)  # fmt: skip
    launch(explorer, host=args.host, port=args.port)
    return 0


def register(subparsers) -> None:
    """Add the ``explore`` subcommand."""
    from ..loading import FAMILIES

    p = subparsers.add_parser(
        "explore",
        help="browser app: what each method keeps on any image at any budget (needs globalcom2[app])",
        description="Serve a page (Gradio) to upload an image or pick a shipped photo, choose methods, R or a token "
        "budget and GlobalCom²'s options, and see the kept tokens, the counts, the paper's prefill FLOPs and the "
        "plan as JSON.",
    )
    p.add_argument("--model", default="standin",
                   help="'standin' (offline DINOv2 stand-in tower with a tiny random LLM) or a checkpoint path / "
                   "hub id")  # fmt: skip
    p.add_argument("--family", choices=FAMILIES, default="llava_next",
                   help="the stand-in family shown first (the page switches between them); ignored for a "
                   "checkpoint")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind; loopback unless told otherwise")
    p.add_argument("--port", type=_port, default=7860, help="TCP port")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype; auto keeps the checkpoint's")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_explore)
