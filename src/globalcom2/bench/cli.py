"""`globalcom2 bench`: analytic FLOPs / KV cache and measured time, memory and throughput, uncompressed vs each R.

Picked up by ``globalcom2.cli`` through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cli_common import (
    CLIError,
    add_method_options,
    method_options,
    parse_positive_int,
    parse_ratios,
    resolve_device,
    write_json,
)
from ..demo.tiny_families import FAMILIES as STANDIN_FAMILIES
from ..demo.tiny_families import RANDOM_TOWER_FAMILIES

# Defaults per device. CPU: small enough for ~5 min on 2 cores; CUDA: the real LLaVA-NeXT-7B depth.
CPU_DEFAULTS = {"dtype": "float32", "vision_layers": 24, "llm_layers": 1, "repeats": 3, "throughput_repeats": 1,
                "batch": 4, "new_tokens": 4}  # fmt: skip
CUDA_DEFAULTS = {"dtype": "float16", "vision_layers": 24, "llm_layers": 32, "repeats": 5, "throughput_repeats": 3,
                 "batch": 4, "new_tokens": 4}  # fmt: skip


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must be HEIGHTxWIDTH, e.g. 672x672; got {text!r}"
        ) from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return h, w


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="efficiency benchmark: FLOPs, KV cache, vision/selection/prefill time, peak memory, throughput",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random model, for tests and smoke checks (about 5-25 s on 2 CPU cores; with --table4 about "
        "3 min)",
    )
    p.add_argument("--analytic-only", action="store_true", help="print the analytic tables only (instant)")
    p.add_argument(
        "--from-json", metavar="FILE", help="re-render tables, --plot and --md from a saved --json result"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="auto: float32 on CPU, float16 on CUDA")  # fmt: skip
    p.add_argument(
        "--vision-layers",
        "--layers",
        type=parse_positive_int,
        default=None,
        help="CLIP tower depth (default 24)",
    )
    p.add_argument("--vision-stage", action="store_true",
                   help="plain vs compressed vision stage, scoring/selection share and prefill per family")  # fmt: skip
    p.add_argument("--families", default=None, help="--vision-stage: comma-separated families (default: all)")
    p.add_argument(
        "--llm-layers", type=parse_positive_int, default=None, help="LLM depth (default 1 on CPU, 32 on CUDA)"
    )
    p.add_argument(
        "--image-size", type=_image_size, default=None, help="HxW of the benchmark image (672x672)"
    )
    p.add_argument("--ratios", type=parse_ratios, default=(0.5, 0.25, 0.1),
                   help="comma-separated retention ratios R in (0, 1], each measured against uncompressed")  # fmt: skip
    p.add_argument(
        "--repeats",
        type=parse_positive_int,
        default=None,
        help="timed runs per setting (default 3 on CPU, 5 on CUDA)",
    )
    p.add_argument("--batch", type=parse_positive_int, default=None, help="throughput batch size (default 4)")
    p.add_argument(
        "--new-tokens",
        type=parse_positive_int,
        default=None,
        help="tokens generated per sample in throughput (default 4)",
    )
    p.add_argument("--throughput-repeats", type=parse_positive_int, default=None,
                   help="timed throughput runs per setting (default 1 on CPU, 3 on CUDA)")  # fmt: skip
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument("--table4", action="store_true",
                   help="Table-4-style rows instead: SparseVLM, FasterVLM, GlobalCom², FastV, PDrop at the smallest "
                        "--ratios R on one model and image (LLM depth default 32; see docs/bench.md)")  # fmt: skip
    p.add_argument("--family", default="llava_next", choices=STANDIN_FAMILIES,
                   help="--table4: the model family (every registered one); other than llava_next, its offline "
                        "stand-in with a random LLM of --llm-layers layers: the DINOv2 tower, or a random tower of the "
                        f"family's own class for {', '.join(RANDOM_TOWER_FAMILIES)} (no stand-in fits it)")  # fmt: skip
    p.add_argument("--methods", default=None,
                   help="--table4: comma-separated rows, 'uncompressed' or any apply_method name "
                        "(default: uncompressed,sparsevlm,fastervlm,globalcom2,fastv,pdrop)")  # fmt: skip
    p.add_argument(
        "--threads", type=parse_positive_int, default=None, help="torch CPU threads (default: all cores)"
    )
    p.add_argument(
        "--text-tokens", type=int, default=64, help="text tokens assumed by the analytic config table"
    )
    p.add_argument(
        "--json", metavar="FILE", help="write every record (and the analytic tables) as JSON to FILE"
    )
    p.add_argument("--plot", metavar="FILE", help="write a PNG of time and memory vs R")
    p.add_argument("--md", metavar="FILE", help="write a short Markdown summary")
    add_method_options(p)
    p.set_defaults(func=cmd_bench)


def settings_from_args(args: argparse.Namespace):
    """Turn parsed arguments into :class:`~globalcom2.bench.measure.BenchSettings`.

    An option left out takes the ``--tiny`` preset's value, else the device's defaults (``CPU_DEFAULTS`` /
    ``CUDA_DEFAULTS``).
    """
    from .measure import REAL, BenchSettings

    device = resolve_device(args.device)
    defaults: dict[str, Any] = dict(CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS)
    base = BenchSettings.tiny() if args.tiny else BenchSettings(geometry=REAL)
    if args.tiny:  # the preset's own sizes win over the device defaults
        defaults.update(
            vision_layers=base.geometry.vision_layers, llm_layers=base.geometry.llm_layers, repeats=base.repeats,
            throughput_repeats=base.throughput_repeats, new_tokens=base.new_tokens,
        )  # fmt: skip

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return value if value is not None else defaults[name]

    geometry = replace(base.geometry, vision_layers=pick("vision_layers"), llm_layers=pick("llm_layers"))
    return replace(
        base,
        geometry=geometry,
        device=device,
        dtype=defaults["dtype"] if args.dtype == "auto" else args.dtype,
        image_size=args.image_size or base.image_size,
        ratios=tuple(args.ratios),
        repeats=pick("repeats"),
        batch=pick("batch"),
        new_tokens=pick("new_tokens"),
        throughput_repeats=pick("throughput_repeats"),
        throughput=not args.no_throughput,
        method=method_options(args),
        threads=args.threads,
    )


def settings_command(settings: Any, tiny: bool = False) -> str:
    """The explicit command line that reproduces ``settings`` (every default spelled out)."""
    g = settings.geometry
    parts = ["globalcom2", "bench"] + (["--tiny"] if tiny else [])
    parts += [
        "--device", settings.device, "--dtype", settings.dtype, "--vision-layers", str(g.vision_layers),
        "--llm-layers", str(g.llm_layers), "--image-size", "x".join(map(str, settings.image_size)),
        "--ratios", ",".join(f"{r:g}" for r in settings.ratios), "--repeats", str(settings.repeats),
        "--batch", str(settings.batch), "--new-tokens", str(settings.new_tokens),
        "--throughput-repeats", str(settings.throughput_repeats),
    ]  # fmt: skip
    if not settings.throughput:
        parts.append("--no-throughput")
    if settings.threads:
        parts += ["--threads", str(settings.threads)]
    for key, value in settings.method.items():
        if key != "mode":
            parts += [f"--{key}", str(value)]
    return shlex.join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from .report import analytic, format_analytic, format_measured, markdown_report

    if getattr(args, "vision_stage", False):
        from .vision_stage import cmd_vision_stage

        return cmd_vision_stage(args)
    if args.mode != "budget":
        raise CLIError(
            "bench measures budget mode (the token count is known before the forward); drop --mode"
        )
    if getattr(args, "table4", False):
        return _cmd_table4(args)
    if args.from_json:
        from .measure import evaluate_targets

        result: dict[str, Any] = json.loads(Path(args.from_json).read_text())
        if "records" in result:
            result["targets"] = evaluate_targets(result)
        print(format_analytic(result["analytic"]))
    else:
        ana = analytic(image_size=args.image_size or (672, 672), text_tokens=args.text_tokens)
        print(format_analytic(ana), flush=True)
        result = {"analytic": ana}
        if not args.analytic_only:
            from .measure import run_bench

            settings = settings_from_args(args)
            print(flush=True)
            result.update(run_bench(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True)))
            result["meta"]["command"] = settings_command(settings, tiny=args.tiny)
    measured = "records" in result
    if measured:
        print()
        print(format_measured(result))
    if args.json and not args.from_json:
        write_json(args.json, result)
    if args.plot and measured:
        from .plot import plot_results

        print(f"wrote {plot_results(result, args.plot)}")
    if args.md and measured:
        out = Path(args.md)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_rel = os.path.relpath(Path(args.plot).resolve(), out.parent.resolve()) if args.plot else ""
        out.write_text(markdown_report(result, command=result["meta"].get("command", ""), plot=plot_rel))
        print(f"wrote {out}")
    return 0


def _cmd_table4(args: argparse.Namespace) -> int:
    """`globalcom2 bench --table4`: :mod:`globalcom2.bench.table4` at the smallest of ``--ratios``."""
    from .table4 import TABLE4_METHODS, check_table4_methods, format_table4, run_table4

    try:
        methods = check_table4_methods(
            tuple(m for m in args.methods.split(",") if m) if args.methods else TABLE4_METHODS
        )
    except ValueError as err:
        raise CLIError(f"--methods: {err}") from None
    if args.llm_layers is None:
        args.llm_layers = 32  # the paper's depth: multi-stage methods need it to average R = 10 %
    settings = settings_from_args(args)
    try:
        result = run_table4(settings, methods=methods, ratio=min(settings.ratios), family=args.family,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))  # fmt: skip
    except (
        ValueError,
        TypeError,
    ) as err:  # a method the family does not run, an R out of reach: before building
        raise CLIError(str(err)) from None
    result["meta"]["command"] = (
        settings_command(settings, tiny=args.tiny)
        + " --table4"
        + (f" --family {args.family}" if args.family != "llava_next" else "")
        + (f" --methods {','.join(methods)}" if args.methods else "")
    )
    print(format_table4(result))
    if args.json:
        write_json(args.json, result)
    return 0
