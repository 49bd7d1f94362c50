"""Record and compare a corpus of GlobalCom² plans on the three tiny model families (refactor safety net).

``record`` builds the tiny random LLaVA-NeXT, LLaVA-OneVision and InternVL checkpoints offline (seeded, so the
weights are the same on every run), then for every family x image size x ratio x option set applies GlobalCom²,
runs one plain forward on one image and stores the resulting plan's fields as CPU tensors / ints. ``compare``
matches two recordings case by case and reports which plans and which fields differ.

Usage (run the code under test via ``PYTHONPATH``, e.g. a frozen ``git worktree`` of the old commit)::

    export HF_HUB_OFFLINE=1
    PYTHONPATH=../before/src python scripts/plan_corpus.py record /tmp/corpus_before.pt
    python scripts/plan_corpus.py record /tmp/corpus_after.pt [--quick]
    python scripts/plan_corpus.py compare /tmp/corpus_before.pt /tmp/corpus_after.pt

``compare`` always exits 0; read its summary. A case whose ``apply``/forward raised is recorded with its error
message (field ``error``) and compared like any other field.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("llava_next", "llava_onevision", "internvl")
PROMPTS = {
    "llava_next": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "llava_onevision": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "internvl": "USER: <IMG_CONTEXT>\nWhat is shown in this image? ASSISTANT:",
}
# (width, height) PIL sizes. Tiles: LLaVA-NeXT 64 px (1x2 .. 3x1 grids up to 192 px), OneVision 56 px (every
# a x b grid up to 6 x 6, anyres_max_9 down-sampling for large ones), InternVL 112 px (up to 6 dynamic tiles).
COMMON_SIZES: tuple[tuple[int, int], ...] = (
    (300, 200), (37, 211), (640, 427), (200, 300), (512, 512), (1000, 90), (90, 1000), (333, 777),
    (48, 40), (150, 130),
)  # fmt: skip
FAMILY_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "llava_next": ((64, 64), (128, 60), (60, 128)),
    "llava_onevision": ((56, 56), (170, 150), (70, 40), (108, 46)),
    "internvl": ((112, 112), (180, 100), (200, 50), (130, 400)),
}
RATIOS = (0.5, 0.25, 0.1)
QUICK_SIZES: tuple[tuple[int, int], ...] = ((300, 200), (37, 211), (1000, 90), (512, 512))
QUICK_RATIOS = (0.25,)
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")
SCORINGS = ("holistic", "local", "global")
COSINE_FAMILIES = ("llava_next", "internvl")
TENSOR_FIELDS = (
    "thumbnail_mask", "crops_mask", "crop_keep_counts", "crop_valid_counts", "crop_ratios", "thumbnail_order",
    "token_mask", "token_grid",
)  # fmt: skip
SCALAR_FIELDS = ("num_tokens", "num_tokens_full", "grid", "valid_box", "mode")
FIELDS = ("error", *TENSOR_FIELDS, *SCALAR_FIELDS)
MASK_FIELDS = ("thumbnail_mask", "crops_mask", "token_mask")


# -- building the tiny families ---------------------------------------------------------------------------------
BUILDER_MODULES = ("globalcom2.testing", "globalcom2.demo.tiny_model", "globalcom2.demo.tiny_families",
                   "globalcom2.loading")  # fmt: skip


def tiny_builders() -> dict[str, Callable[..., Any]]:
    """The tiny-checkpoint builders/loaders, each taken from the first of :data:`BUILDER_MODULES` that has it
    (``globalcom2.testing`` may not exist; the demo modules and the loader may move)."""
    import importlib

    names = ("build_tiny_llava_next", "load_tiny", "build_tiny_llava_onevision", "build_tiny_internvl",
             "load_tiny_family")  # fmt: skip
    found: dict[str, Callable[..., Any]] = {}
    for module_name in BUILDER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if name not in found and callable(getattr(module, name, None)):
                found[name] = getattr(module, name)
    if "load_tiny" not in found and "load_tiny_family" in found:
        found["load_tiny"] = found["load_tiny_family"]  # it loads LLaVA-NeXT checkpoints too
    missing = [name for name in names if name not in found]
    if missing:
        raise ImportError(f"tiny builders not found in {BUILDER_MODULES}: {missing}")
    return found


def build_family(family: str, root: Path) -> tuple[Any, Any]:
    """Write ``family``'s tiny checkpoint under ``root`` (seeded) and load a fresh (model, processor) pair."""
    b = tiny_builders()
    torch.manual_seed(0)
    out = root / family
    if family == "llava_next":
        return b["load_tiny"](b["build_tiny_llava_next"](out, seed=0))
    if family == "llava_onevision":
        return b["load_tiny_family"](b["build_tiny_llava_onevision"](out, seed=0))
    if family == "internvl":
        return b["load_tiny_family"](b["build_tiny_internvl"](out, seed=0))
    raise ValueError(f"unknown family {family!r}")


def random_image(height: int, width: int, seed: int = 0) -> Any:
    """Smooth random blobs, exactly as ``tests/conftest.py::random_image``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


# -- the cases --------------------------------------------------------------------------------------------------
def option_sets(family: str) -> list[dict[str, Any]]:
    """The full cross product mode x score x allocation x scoring; the same again with ``importance="cosine"``
    where the family's tower has a [CLS] (otherwise cosine is already the default); and a few alpha/tau
    settings per mode."""
    sets: list[dict[str, Any]] = []
    importances = ("auto", "cosine") if family in COSINE_FAMILIES else ("auto",)
    for mode in ("budget", "reference"):
        for importance in importances:
            for score in ("logits", "softmax"):
                for allocation in ALLOCATIONS:
                    for scoring in SCORINGS:
                        options = {"mode": mode, "score": score, "allocation": allocation, "scoring": scoring}
                        if importance != "auto":
                            options["importance"] = importance
                        sets.append(options)
        sets += [{"mode": mode, "alpha": alpha} for alpha in (0.0, 1.0)]
        sets += [{"mode": mode, "tau": tau} for tau in (1.0, 100.0)]
    return sets


def sizes_for(family: str, quick: bool) -> tuple[tuple[int, int], ...]:
    return QUICK_SIZES if quick else COMMON_SIZES + FAMILY_SIZES[family]


def case_key(case: dict[str, Any]) -> tuple:
    return (case["family"], tuple(case["size"]), float(case["ratio"]), tuple(sorted(case["options"].items())))


def cases_for(family: str, quick: bool) -> Iterator[tuple[tuple[int, int], float, dict[str, Any]]]:
    option_list = option_sets(family)
    if quick:
        option_list = [
            o for o in option_list if o.get("score") == "logits" and o.get("allocation") != "uniform"
        ]
    for size in sizes_for(family, quick):
        for ratio in QUICK_RATIOS if quick else RATIOS:
            for options in option_list:
                yield size, ratio, options


# -- recording --------------------------------------------------------------------------------------------------
def _cpu(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, (tuple, list)):
        return tuple(int(v) if isinstance(v, (int, np.integer, torch.Tensor)) else v for v in value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def plan_fields(plan: Any) -> dict[str, Any]:
    """The plan's fields as CPU tensors / ints / tuples; absent attributes are None."""
    return {name: _cpu(getattr(plan, name, None)) for name in (*TENSOR_FIELDS, *SCALAR_FIELDS)}


def run_case(
    model: Any, processor: Any, family: str, image: Any, ratio: float, options: dict[str, Any]
) -> dict:
    import globalcom2

    handle = globalcom2.apply(model, processor, ratio=ratio, **options)
    try:
        inputs = processor(images=[image], text=[PROMPTS[family]], return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        return plan_fields(handle.plans[0])
    finally:
        handle.remove()


def _progress(items: list, desc: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"{desc}: {len(items)} cases", flush=True)
        return items
    return tqdm(items, desc=desc, mininterval=2.0, file=sys.stdout)


def record(out: Path, quick: bool) -> None:
    import globalcom2

    torch.set_num_threads(2)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    start = time.perf_counter()
    print(f"globalcom2 from {globalcom2.__file__}", flush=True)
    records: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="plan_corpus_") as tmp:
        for family in FAMILIES:
            model, processor = build_family(family, Path(tmp))
            images = {size: random_image(size[1], size[0], seed=0) for size in sizes_for(family, quick)}
            for size, ratio, options in _progress(list(cases_for(family, quick)), family):
                case: dict[str, Any] = {
                    "family": family,
                    "size": size,
                    "ratio": ratio,
                    "options": dict(options),
                }
                try:
                    case.update(run_case(model, processor, family, images[size], ratio, options))
                    case["error"] = None
                except Exception as err:  # recorded, so that compare shows it
                    case["error"] = f"{type(err).__name__}: {err}"
                    errors[f"{family}: {case['error'][:160]}"] += 1
                records.append(case)
            del model, processor
    elapsed = time.perf_counter() - start
    meta = {
        "globalcom2_file": str(globalcom2.__file__),
        "torch": torch.__version__,
        "quick": quick,
        "seconds": round(elapsed, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "plans": records}, out)
    grids = Counter((r["family"], r.get("grid")) for r in records if r["error"] is None)
    print("grids per family:", ", ".join(f"{f} {g}: {n}" for (f, g), n in sorted(grids.items(), key=str)))
    for message, n in errors.most_common():
        print(f"  error x{n}: {message}")
    print(f"recorded {len(records)} plans ({sum(errors.values())} errors) in {elapsed:.1f} s -> {out}")


# -- comparing --------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def _describe(name: str, a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.dtype != b.dtype:
            note = f"{name}: dtype {a.dtype} vs {b.dtype}"
            if torch.equal(a.to(torch.float64), b.to(torch.float64)):
                return note + " (values equal)"
            a, b = a.to(torch.float64), b.to(torch.float64)
        else:
            note = name
        diff = a != b
        if name in MASK_FIELDS:
            return f"{note}: {int(diff.sum())} of {a.numel()} tokens differ"
        if a.is_floating_point():
            return (
                f"{note}: {int(diff.sum())} of {a.numel()} differ (max |d| {float((a - b).abs().max()):.3g})"
            )
        return f"{note}: {int(diff.sum())} of {a.numel()} differ ({a.tolist()} vs {b.tolist()})"
    return f"{name}: {_short(a)[:120]} vs {_short(b)[:120]}"


def _short(value: Any) -> str:
    return str(value.tolist()) if isinstance(value, torch.Tensor) else repr(value)


def normalise(case: dict[str, Any]) -> dict[str, Any]:
    """One representation for both recordings: ``token_mask``/``token_grid`` only where the crop token grid differs
    from the valid box (OneVision's down-sampling). The old code also filled them in when the grid was not
    down-sampled, where they only repeat ``crops_mask`` inside the valid box (checked here before dropping them)."""
    grid, box = case.get("token_grid"), case.get("valid_box")
    if grid is None or box is None or tuple(grid) != (box[1] - box[0], box[3] - box[2]):
        return case
    top, bottom, left, right = box
    if not torch.equal(case["token_mask"], case["crops_mask"][top:bottom, left:right]):
        return case  # not a pure repetition: leave it, so that the comparison reports it
    return {**case, "token_mask": None, "token_grid": None}


def global_only(options: dict[str, Any]) -> bool:
    """Crop tokens ranked by the resized thumbnail map alone (scoring 'global', or holistic with alpha = 1)."""
    scoring = options.get("scoring", "holistic")
    return scoring == "global" or (scoring == "holistic" and float(options.get("alpha", 0.5)) == 1.0)


def compare(path_a: Path, path_b: Path, max_lines: int = 200) -> None:
    a_data = torch.load(path_a, weights_only=False)
    b_data = torch.load(path_b, weights_only=False)
    for label, data in (("A", a_data), ("B", b_data)):
        print(f"{label}: {data['meta']}")
    a = {case_key(c): normalise(c) for c in a_data["plans"]}
    b = {case_key(c): normalise(c) for c in b_data["plans"]}
    only_a, only_b = sorted(set(a) - set(b), key=str), sorted(set(b) - set(a), key=str)
    common = [k for k in a if k in b]
    per_family: Counter[str] = Counter()
    per_family_diff: Counter[str] = Counter()
    per_field: Counter[str] = Counter()
    per_family_field: Counter[tuple[str, str]] = Counter()
    identical, shown = 0, 0
    global_only_diff = 0
    for key in common:
        family = key[0]
        per_family[family] += 1
        differing = [f for f in FIELDS if not _same(a[key].get(f), b[key].get(f))]
        if not differing:
            identical += 1
            continue
        per_family_diff[family] += 1
        global_only_diff += global_only(dict(key[3]))
        for f in differing:
            per_field[f] += 1
            per_family_field[(family, f)] += 1
        if shown < max_lines:
            shown += 1
            opts = ",".join(f"{k}={v}" for k, v in key[3])
            print(f"DIFF {family} {key[1][0]}x{key[1][1]} r={key[2]} {opts}")
            for f in differing:
                print(f"    {_describe(f, a[key].get(f), b[key].get(f))}")
    if shown == max_lines:
        print(f"... (only the first {max_lines} differing plans are listed)")
    for label, keys in (("only in A", only_a), ("only in B", only_b)):
        if keys:
            print(f"{len(keys)} cases {label}, e.g. {keys[:3]}")
    print()
    print(f"total plans: A {len(a)}, B {len(b)}, matched {len(common)}; identical {identical}, "
          f"differing {len(common) - identical}")  # fmt: skip
    fields_seen = [f for f in FIELDS if per_field[f]]
    widths = {f: len(f) + 2 for f in fields_seen}
    header = f"{'family':<16}{'plans':>7}{'identical':>10}{'differ':>8}"
    print(header + "".join(f"{f:>{widths[f]}}" for f in fields_seen))
    print("-" * (len(header) + sum(widths.values())))
    for family in sorted(per_family):
        n, n_diff = per_family[family], per_family_diff[family]
        row = f"{family:<16}{n:>7}{n - n_diff:>10}{n_diff:>8}"
        print(row + "".join(f"{per_family_field[(family, f)]:>{widths[f]}}" for f in fields_seen))
    total = f"{'all':<16}{len(common):>7}{identical:>10}{len(common) - identical:>8}"
    print(total + "".join(f"{per_field[f]:>{widths[f]}}" for f in fields_seen))
    n_diff = len(common) - identical
    if n_diff:
        print(
            f"{global_only_diff} of the {n_diff} differing plans rank crop tokens by the resized thumbnail map alone"
        )
    verdict = "IDENTICAL" if identical == len(common) and not only_a and not only_b else "DIFFERENT"
    print(f"verdict: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the plans of the globalcom2 on sys.path")
    rec.add_argument("out", type=Path)
    rec.add_argument(
        "--quick",
        action="store_true",
        help="a small subset (4 sizes, one ratio, logits scores, no uniform allocation)",
    )
    cmp_ = sub.add_parser("compare", help="compare two recordings (always exits 0)")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    cmp_.add_argument("--max-lines", type=int, default=200, help="most differing plans listed in detail")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out, args.quick)
    else:
        compare(args.a, args.b, args.max_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
