"""`globalcom2` command line: demo, ask, visualize (and the subcommands other modules register).

Errors print one line (``globalcom2: error: ...``) and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_common import CLIError, add_method_options, method_options, parse_ratio, parse_ratios
from .loading import FAMILIES, ModelLoadError, load_model_and_processor

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
        help="LLaVA-NeXT / OneVision / InternVL checkpoint path or hub id, or 'standin'",
    )
    p.add_argument(
        "--family", choices=FAMILIES, default="llava_next", help="stand-in geometry for --model standin"
    )
    p.add_argument("--image", required=True, help="image file, or photo:NAME for a shipped photo")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="cpu")


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


def cmd_ask(args: argparse.Namespace) -> int:
    import torch

    import globalcom2

    from .workflows import default_prompt

    image = load_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
    prompt = default_prompt(processor, args.question)
    full = processor(images=[image], text=[prompt], return_tensors="pt")
    num_full = int((full["input_ids"] == model.config.image_token_id).sum())
    with globalcom2.apply(model, processor, ratio=args.ratio, **method_options(args)) as handle:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        plan = handle.plans[0]
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    result = {
        "answer": answer,
        "image_tokens_full": num_full,
        "image_tokens": plan.num_tokens,
        **plan.summary(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(answer)
        print(f"[image tokens: {plan.num_tokens} of {num_full} ({plan.num_tokens / num_full:.1%}), "
              f"ratio R={args.ratio}, mode={args.mode}]", file=sys.stderr)  # fmt: skip
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    if getattr(args, "methods", None):  # side-by-side comparison of methods
        from .evaluation.visual import parse_methods, visualize_methods

        methods = parse_methods(args.methods)  # unknown names fail before anything loads
        image = load_image(args.image)
        model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
        return visualize_methods(args, methods, image, model, processor, method_options(args))
    from .viz.overlay import render_grid
    from .workflows import plan_for_image, render_plan

    image = load_image(args.image)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, family=args.family)
    ratios = args.ratios or (args.ratio,)
    panels, plans = [], []
    for ratio in ratios:
        plan = plan_for_image(model, processor, image, ratio=ratio, **method_options(args))
        title = f"{Path(args.image).name} ({image.width}x{image.height}), R = {ratio:.0%}, {args.mode}"
        panels.append((f"R = {ratio:.0%}", render_plan(image, plan, model, title)))
        plans.append({"ratio": ratio, **plan.summary()})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="globalcom2", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="offline demo: real photos, real DINOv2 stand-in encoder, tiny LLaVA-NeXT"
    )
    p.add_argument("--out", default="globalcom2_demo_out")
    p.add_argument("--photos", default="astronaut,coffee,chelsea,rocket,china,grace_hopper")
    p.add_argument("--ratios", type=parse_ratios, default=(0.5, 0.25, 0.1))
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (interleaved across settings)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of tables")
    p.add_argument("--family", choices=FAMILIES, default="llava_next", help="stand-in model geometry")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ask", help="answer a question about an image with a compressed LLaVA-NeXT checkpoint")
    _add_model_args(p)
    p.add_argument("--ratio", type=parse_ratio, required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("question")
    add_method_options(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("visualize", help="Figure-7-style overlay of the kept tokens")
    _add_model_args(p)
    p.add_argument("--ratio", type=parse_ratio, default=0.25)
    p.add_argument("--ratios", type=parse_ratios, default=None, help="several ratios, e.g. 0.5,0.25,0.1")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--methods",
        default=None,
        help="side-by-side methods, e.g. globalcom2,fastervlm,fastv,random,pooling,globalcom2+fastv",
    )
    p.add_argument("--question", default="What is shown in this image?", help="prompt for LLM-side methods")
    add_method_options(p)
    p.set_defaults(func=cmd_visualize)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Subcommands living beside their feature (bench, eval, ...): each module exposes ``register(subparsers)``."""
    import importlib

    found = []
    for module in ("globalcom2.bench.cli", "globalcom2.evaluation.cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("globalcom2: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"globalcom2: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not a usage error: still one line, the traceback behind --debug
        if args.debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"globalcom2: internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    # CLIError lives in cli_common, so this __main__ copy of the module and the subcommands share the class
    sys.exit(main())
