"""globalcom2: training-free visual-token compression (GlobalCom²) for high-resolution vision-language models.

Errors print one line (``globalcom2: error: ...``) and exit with status 2 (usage errors, unreadable inputs, missing
optional dependencies: the line names the pip command); a bug prints ``globalcom2: internal error: ...`` and exits
with status 1. ``--debug`` (before or after the subcommand) also shows the traceback; the exit status is the same.
With ``--json`` the standard output holds the JSON and nothing else.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .cli_common import (
    CLIError,
    CLIParser,
    add_budget_options,
    add_method_options,
    budget_options,
    json_only_stdout,
    method_options,
    parse_positive_int,
    parse_ratios,
)
from .demo.tiny_families import DEMO_FAMILIES
from .extras import missing_dependency
from .loading import FAMILIES, ModelLoadError, load_model_and_processor
from .methods import available_methods

#: What ``ask --model standin`` says before it answers (stderr, and ``note`` in the JSON).
STANDIN_NOTE = (
    "note: --model standin pairs a real DINOv2 vision tower with a tiny RANDOM LLM, so its answer is "
    "meaningless; the token counts and the kept tokens are real"
)

__all__ = ["CLIError", "add_method_options", "build_parser", "load_image", "load_model", "main", "method_options",
           "to_rgb"]  # fmt: skip


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB, without the silent damage of a bare ``convert("RGB")``.

    - 16-bit images (``I;16*``) are scaled from 0-65535 to 0-255 (``convert`` would clip every value above 255 to
      white); 32-bit integer images (``I``) likewise when their values exceed 255 (by 0-65535 when they fit, else
      by their own min-max); float images (``F``) from 0-1 when they fit, else by their own min-max;
    - transparency (RGBA, LA, palette with a transparent index) is composited onto white, as HF's processors do;
    - CMYK, YCbCr, palette, grayscale and bilevel images go through PIL's own conversion.
    """
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and 255 < hi <= 65535):
            lo, hi = 0.0, 65535.0
        elif image.mode == "I" and lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str):
    """Open an image file fully (so truncated files fail here, with the file's name), as 8-bit RGB.

    EXIF orientation is applied; see :func:`to_rgb` for the mode conversion. Every failure is a one-line
    :class:`CLIError` naming the file.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.startswith("photo:"):
        from .demo.photos import load_photo

        try:
            return load_photo(path.split(":", 1)[1])
        except ValueError as err:
            raise CLIError(str(err)) from None
    file = Path(path)
    if file.is_dir():
        raise CLIError(f"cannot read image {path}: it is a directory")
    if not file.is_file():
        raise CLIError(f"image file not found: {path}")
    if file.stat().st_size == 0:
        raise CLIError(f"cannot read image {path}: the file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's size guard: above ~89 Mpx a warning, above ~179 Mpx an error (handled below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as err:
        raise CLIError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"cannot read image {path}: {reason}") from None


def load_model(name: str, *, dtype: str = "auto", device: str = "cpu", family: str = "llava_next"):
    """:func:`globalcom2.loading.load_model_and_processor`, its :class:`~globalcom2.loading.ModelLoadError` as a
    :class:`CLIError` (the same one line; ``--debug`` shows the loader's traceback as the cause)."""
    try:
        return load_model_and_processor(name, dtype=dtype, device=device, family=family)
    except ModelLoadError as err:
        raise CLIError(str(err)) from err


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint path or hub id of a supported model (any family `globalcom2.apply` takes), or 'standin' "
        "(offline DINOv2 stand-in vision tower with a tiny random LLM; pick its geometry with --family)",
    )
    p.add_argument(
        "--family", choices=FAMILIES, default="llava_next", help="stand-in geometry for --model standin"
    )
    p.add_argument("--image", required=True, help="image file, or photo:NAME for a shipped photo")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype; auto keeps the checkpoint's")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")


# -- subcommands ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.photos import PHOTOS
    from .demo.run import run_demo

    photos = tuple(p.strip() for p in args.photos.split(",") if p.strip())
    unknown = [p for p in photos if p not in PHOTOS]
    if unknown:
        raise CLIError(f"unknown photo(s) {unknown}; available: {', '.join(PHOTOS)}")
    log = (lambda *_: None) if args.json else print
    summary = run_demo(args.out, photos=photos, ratios=args.ratios, repeats=args.repeats,
                       progress=not args.no_progress, log=log, family=args.family)  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: symbol -> the byte it stands for."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in shown]  # drawn as chr(256), chr(257), ...
    table = {chr(b): b for b in shown}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def readable_answer(tokenizer, ids: list[int]) -> tuple[str, bool]:
    """Generated token ids as readable text: ``(text, clean)``.

    ``clean`` is False when the tokens are not valid UTF-8 text (a random LLM emits stray bytes): then bytes that
    do not decode are shown as ``\\xNN`` (byte-level BPE tokenizers) instead of a row of U+FFFD replacement
    characters. Unprintable characters other than newlines and tabs are always shown as escapes.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    clean = "\ufffd" not in text
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not clean and backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        special = set(tokenizer.all_special_ids)
        table = _byte_level_decoder()
        tokens = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
        if all(isinstance(t, str) and all(ch in table for ch in t) for t in tokens):
            text = bytes(table[ch] for t in tokens for ch in t).decode("utf-8", errors="backslashreplace")
    text = text.strip()
    shown = "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return shown, clean and shown == text


def cmd_ask(args: argparse.Namespace) -> int:
    import torch

    import globalcom2

    from .workflows import default_prompt

    standin = str(args.model) == "standin"
    # bad options fail before the checkpoint loads
    globalcom2.GlobalComConfig(**budget_options(args), **method_options(args))
    image = load_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
    prompt = default_prompt(processor, args.question)
    full = processor(images=[image], text=[prompt], return_tensors="pt")
    num_full = int((full["input_ids"] == model.config.image_token_id).sum())
    prompt_full = int(full["input_ids"].shape[1])
    with globalcom2.apply(model, processor, **budget_options(args), **method_options(args)) as handle:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        plan = handle.plans[0]
    if standin:  # after the image was accepted, so a usage error stays the only line
        print(STANDIN_NOTE, file=sys.stderr, flush=True)
    new_ids = [int(i) for i in out[0, inputs["input_ids"].shape[1] :].tolist()]
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    shown, clean = readable_answer(tokenizer, new_ids)
    # the prompt the LLM reads (reference mode shrinks the processor's prompt inside generate)
    prompt_kept = prompt_full - num_full + plan.num_tokens
    # the image's span as --max-image-tokens counts it: placeholders plus the family's layout tokens (markers)
    layout = handle.adapter.layout_tokens((int(plan.grid[0]), int(plan.grid[1])))
    span_full, span_kept = num_full + layout, plan.num_tokens + layout
    budget = "" if args.max_image_tokens is None else f" (max image tokens {args.max_image_tokens})"
    counts = (
        f"image tokens {span_full} -> {span_kept} kept ({span_kept / max(span_full, 1):.1%}; "
        f"{handle.adapter.layout_label}), prompt tokens {prompt_full} -> {prompt_kept}, "
        f"R = {plan.ratio:.4g}{budget}, mode {args.mode}"
    )
    result = {
        "answer": answer,
        "answer_readable": shown,
        "answer_is_text": clean,
        "answer_token_ids": new_ids,
        "image_tokens_full": num_full,
        "image_tokens": plan.num_tokens,
        # what --max-image-tokens bounds: image_tokens + layout_tokens (markers around/between the runs)
        "layout_tokens": layout,
        "prompt_tokens_full": prompt_full,
        "prompt_tokens": prompt_kept,
        "ratio": plan.ratio,
        "max_image_tokens": args.max_image_tokens,
        **({"note": STANDIN_NOTE.removeprefix("note: ")} if standin else {}),
        **plan.summary(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(shown)
        if not clean:
            print(f"(the {len(new_ids)} generated tokens are not valid text: undecodable bytes shown as \\xNN)",
                  file=sys.stderr)  # fmt: skip
        print(counts, file=sys.stderr)
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    if getattr(args, "methods", None):  # side-by-side comparison of methods
        from .evaluation.visual import cmd_visualize_methods

        return cmd_visualize_methods(args, method_options(args), load_image=load_image, load_model=load_model)
    from .config import GlobalComConfig
    from .viz.overlay import render_grid
    from .workflows import plan_for_image, render_plan

    GlobalComConfig(**budget_options(args), **method_options(args))  # bad options fail before loading
    image = load_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
    budgets = (
        [{"ratio": None, "max_image_tokens": args.max_image_tokens}]
        if args.max_image_tokens is not None
        else [{"ratio": r, "max_image_tokens": None} for r in args.ratios or (args.ratio,)]
    )
    panels: list[tuple[str | None, Any]] = []
    plans = []
    for budget in budgets:
        plan = plan_for_image(model, processor, image, **budget, **method_options(args))
        ratio = float(plan.ratio if plan.ratio is not None else budget["ratio"])
        label = f"R = {ratio:.0%}"
        if budget["max_image_tokens"] is not None:
            label = f"T = {budget['max_image_tokens']} tokens, R = {ratio:.1%}"
        title = f"{Path(args.image).name} ({image.width}x{image.height}), {label}, {args.mode}"
        panels.append((label, render_plan(image, plan, model, title)))
        plans.append({**budget, **plan.summary(), "ratio": ratio})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(panels) == 1:
        panels[0][1].save(out, format="PNG")
    else:
        render_grid(panels, out, ncols=1)
    if args.json:
        print(json.dumps({"out": str(out), "plans": plans}, indent=2))
    else:
        for p in plans:
            print(
                f"R={p['ratio']:.0%}: {p['num_tokens']}/{p['num_tokens_full']} image tokens, r_j = {p['crop_ratios']}"
            )
        print(f"wrote {out}")
    return 0


_DEBUG_HELP = "on an error, also print the traceback (same exit status); before or after the command"


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="globalcom2", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"globalcom2 {_version()}",
                        help="print the version and exit")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="run 'globalcom2 COMMAND --help' for its options")  # fmt: skip

    p = sub.add_parser(
        "demo",
        help="offline demo: real photos, real DINOv2 stand-in encoder, tiny LLaVA-NeXT",
        description="Offline demo: real photos, a real DINOv2 stand-in vision tower and a tiny random LLM; "
        "writes overlays, summary.json and report.md.",
    )
    p.add_argument("--out", default="globalcom2_demo_out", help="output folder")
    p.add_argument("--photos", default="astronaut,coffee,chelsea,rocket,china,grace_hopper",
                   help="comma-separated shipped photos")  # fmt: skip
    p.add_argument("--ratios", type=parse_ratios, default=(0.5, 0.25, 0.1),
                   help="comma-separated retention ratios R in (0, 1]")  # fmt: skip
    p.add_argument("--repeats", type=parse_positive_int, default=5,
                   help="timing rounds (interleaved across settings); fewer than 3 are flagged as noisy")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the JSON summary (and nothing else) on stdout")
    p.add_argument("--family", choices=DEMO_FAMILIES, default="llava_next", help="stand-in model geometry")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "ask",
        help="answer a question about an image with a compressed model",
        description="Answer a question about an image with GlobalCom² applied; prints the answer on stdout and the "
        "token counts on stderr.",
    )
    _add_model_args(p)
    add_budget_options(p, required=True)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--json", action="store_true",
                   help="print the answer, token counts and plan as JSON (and nothing else) on stdout")  # fmt: skip
    p.add_argument("question", help="the question about the image")
    add_method_options(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "visualize",
        help="Figure-7-style overlay of the kept tokens",
        description="Figure-7-style overlay of the kept tokens (kept in colour, discarded greyed, crop borders, "
        "r_j per crop), one panel per ratio or method.",
    )
    _add_model_args(p)
    budget = add_budget_options(p, ratio_default=0.25)
    budget.add_argument("--ratios", type=parse_ratios, default=None,
                        help="several ratios, e.g. 0.5,0.25,0.1 (one panel each; replaces --ratio)")  # fmt: skip
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--json", action="store_true", help="print the plans as JSON (and nothing else) on stdout")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods side by side: {', '.join(available_methods())}")  # fmt: skip
    p.add_argument("--method-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the --methods that have it, e.g. layers=1,2,3 (pdrop), layer=1 (fastv), "
                   "seed=3 (random); repeatable")  # fmt: skip
    p.add_argument("--question", default="What is shown in this image?", help="prompt for LLM-side methods")
    add_method_options(p)
    p.set_defaults(func=cmd_visualize)

    for register in _extra_commands():
        register(sub)
    for command in sub.choices.values():  # --debug is accepted after the subcommand too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _extra_commands() -> list:
    """Subcommands living beside their feature (bench, eval, ...): each module exposes ``register(subparsers)``."""
    import importlib

    found = []
    for module in ("globalcom2.bench.cli", "globalcom2.evaluation.cli", "globalcom2.app.cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
    return found


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _missing_module(err: BaseException) -> BaseException | None:
    """The ``ModuleNotFoundError`` behind ``err`` (``err`` itself or its explicit causes), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ModuleNotFoundError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def error_line(err: BaseException) -> tuple[str, int]:
    """The one line printed for ``err`` and the exit status: 2 for usage errors, bad inputs and missing optional
    dependencies (the line names the pip command), 1 for a bug."""
    not_found = _missing_module(err)
    if not_found is not None:
        missing = missing_dependency(not_found)
        if missing is not None:
            return f"globalcom2: error: {_first_line(missing)}", 2
        name = getattr(not_found, "name", None) or ""
        if name and not name.startswith("globalcom2"):
            return (f"globalcom2: error: Python module {name!r} is not installed (a dependency of a dependency; "
                    f"rerun with --debug to see which import needs it)", 2)  # fmt: skip
    if isinstance(err, (CLIError, ValueError, TypeError, OSError, RuntimeError)):
        return f"globalcom2: error: {_first_line(err)}", 2
    first = str(err).splitlines()[0] if str(err) else ""
    return f"globalcom2: internal error: {type(err).__name__}: {first}", 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # ``--json`` (a flag here; ``bench --json FILE`` names a file) keeps stdout for the JSON alone
    guard = json_only_stdout() if getattr(args, "json", None) is True else nullcontext()
    try:
        with guard:
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("globalcom2: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        import traceback

        line, status = error_line(err)
        if debug:
            traceback.print_exc()
        elif status == 1:
            line += " (rerun with --debug for the traceback)"
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    # CLIError lives in cli_common, so this __main__ copy of the module and the subcommands share the class
    sys.exit(main())
