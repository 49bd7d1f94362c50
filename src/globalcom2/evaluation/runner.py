"""`globalcom2 eval`: every method x R and the paper's ablations on real photos with the DINOv2 stand-in.

The vision tower runs once per photo; every pre-LLM plan is then computed from those scores by the same planner
functions the adapters call (:func:`globalcom2.adapters.anyres.plan_anyres`, :mod:`globalcom2.methods.vision`), so
a full sweep costs seconds. LLM-side methods (FastV, GlobalCom² + FastV) run through :func:`globalcom2.apply_method`
(= :func:`globalcom2.methods.apply_method`) on the demo model, whose LLM is tiny and random: their numbers show the
mechanism only.

Ablations (paper Tables 2 and 3): allocation in {softmax-sum, softmax-max, topk-count, uniform} x scoring in
{holistic, local, global} x score in {logits, softmax}, all in budget mode (same token count).
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.anyres import AnyresGeometry, anyres_geometry, plan_anyres
from ..adapters.errors import UnsupportedModelError
from ..adapters.towers import describe_tower
from ..config import GlobalComConfig
from ..core.allocation import ALLOCATIONS
from ..core.plan import Plan
from ..core.scores import SCORE_KINDS, cls_attention_scores
from ..core.select import SCORINGS
from ..methods.prumerge import plan_prumerge, prumerge_attention
from ..methods.vision import FASTERVLM, RANDOM, plan_pooling, random_tile_scores
from .metrics import Reference, build_reference, native_reference, plan_metrics

STANDIN_LABEL = (
    "Vision tower: DINOv2 ViT-S/14 at 336 px (real weights), an offline STAND-IN for LLaVA-NeXT's CLIP ViT-L/14-336 "
    "(same 24x24 grid per tile). Metrics compare kept tokens with the stand-in's own attention maps and features "
    "of the uncompressed image: they are fidelity measures, NOT accuracy. FastV and GlobalCom²+FastV run inside a "
    "tiny randomly initialised LLM: mechanism only."
)
VISION_METHODS = ("globalcom2", "fastervlm", "random", "pooling", "prumerge", "prumerge+")
LLM_METHODS = ("fastv", "globalcom2+fastv")
# Multi-stage LLM-side methods (layer-average R): skipped at an R the demo's shallow LLM cannot average.
STAGED_METHODS = ("pdrop", "sparsevlm", "globalcom2+sparsevlm")
QUESTION = "What is shown in this image?"


@dataclass
class PhotoData:
    """Everything the sweep needs about one photo, computed by one pass of the vision tower."""

    name: str
    image: Any
    size: tuple[int, int]  # (height, width)
    geometry: AnyresGeometry  # LLaVA-NeXT tiling of the image (grid, g, valid box)
    scores: dict[str, torch.Tensor]  # kind -> (1 + n, g*g) [CLS] scores (logits / softmax / prumerge)
    reference: Reference
    image_sizes: torch.Tensor  # (1, 2), as the processor gives it
    encoder_output: Any = None  # the unpatched model's image features, reused by FastV's prefills
    features: torch.Tensor | None = None  # (1 + n, g*g, D) patch features at the LLM's feature layer

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    @property
    def g(self) -> int:
        return self.geometry.g


@torch.no_grad()
def photo_data(model: Any, processor: Any, name: str, image: Any) -> PhotoData:
    """Run the (unpatched) vision tower on one photo and build its scores and reference maps."""
    cfg = model.config
    tile = int(cfg.vision_config.image_size)
    g = tile // int(cfg.vision_config.patch_size)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    size = (int(inputs["image_sizes"][0][0]), int(inputs["image_sizes"][0][1]))
    geo = anyres_geometry(size, cfg.image_grid_pinpoints, tile, g)
    grid = geo.grid
    tower = model.model.vision_tower
    pv = inputs["pixel_values"][0, : 1 + grid[0] * grid[1]].to(model.dtype)
    hidden = tower(pv, output_hidden_states=True).hidden_states
    info = describe_tower(tower)
    scores = {
        kind: cls_attention_scores(
            hidden[-2],
            norm=info.norm,
            q_proj=info.q_proj,
            k_proj=info.k_proj,
            num_heads=info.num_heads,
            kind=kind,
            num_prefix_tokens=info.num_prefix_tokens,
        )  # fmt: skip
        for kind in SCORE_KINDS
    }
    scores["prumerge"] = prumerge_attention(hidden[-2], info)[0]  # PruMerge's own (default) [CLS] attention
    feats = hidden[cfg.vision_feature_layer][:, info.num_prefix_tokens :]
    soft = scores["softmax"]
    ref = build_reference(soft[0], soft[1:], feats[1:], grid=grid, valid_box=geo.box)
    return PhotoData(name, image, size, geo, scores, ref, inputs["image_sizes"], features=feats)


def vision_plans(data: PhotoData, ratio: float, *, random_draws: int, seed: int) -> dict[str, list[Plan]]:
    """Plans of the pre-LLM methods, each the selection its adapter makes on the same tile scores.

    GlobalCom² and FasterVLM-style are :func:`~globalcom2.adapters.anyres.plan_anyres` with their configs
    (FasterVLM: :data:`~globalcom2.methods.vision.FASTERVLM` on the softmax scores); random draw ``k`` ranks the
    scores of :func:`~globalcom2.methods.vision.random_tile_scores` with seed ``seed * random_draws + k`` (the
    random method's tokens at that seed); pooling is :func:`~globalcom2.methods.vision.plan_pooling`; PruMerge(+)
    is :func:`~globalcom2.methods.prumerge.plan_prumerge` on its own attention (adaptive: the same plan at every R).
    """
    geo = data.geometry

    def plan(scores: torch.Tensor, **options: Any) -> Plan:
        return plan_anyres(scores, geo, GlobalComConfig(ratio=ratio, **options))[0]

    s_log = data.scores["logits"]
    return {
        "globalcom2": [plan(s_log)],
        "fastervlm": [plan(data.scores[FASTERVLM["score"]], **FASTERVLM)],
        "random": [
            plan(random_tile_scores(s_log.shape, seed * random_draws + k), **RANDOM)
            for k in range(random_draws)
        ],
        "pooling": [plan_pooling(geo, ratio)],
        "prumerge": [plan_prumerge(data.scores["prumerge"], geo, plus=False)[0]],
        "prumerge+": [plan_prumerge(data.scores["prumerge"], geo, plus=True)[0]],
    }


def ablation_settings(quick: bool) -> list[tuple[str, str, str]]:
    """(allocation, scoring, score) of paper Tables 2 x 3 x {logits, softmax}."""
    if quick:
        return [("softmax-sum", "holistic", "logits"), ("uniform", "local", "logits")]
    return list(itertools.product(ALLOCATIONS, SCORINGS, SCORE_KINDS))


def ablation_plans(
    data: PhotoData, ratio: float, settings: Iterable[tuple[str, str, str]]
) -> dict[tuple, Plan]:
    out = {}
    for allocation, scoring, score in settings:
        config = GlobalComConfig(ratio=ratio, allocation=allocation, scoring=scoring, score=score)
        out[(allocation, scoring, score)] = plan_anyres(data.scores[score], data.geometry, config)[0]
    return out


@torch.no_grad()
def llm_plans(model: Any, processor: Any, data: PhotoData, ratio: float, layer: int = 2) -> dict[str, Plan]:
    """Plans of FastV and GlobalCom² + FastV from one prefill each on the demo model (random LLM)."""
    from ..methods import apply_method
    from ..workflows import default_prompt

    prompt = default_prompt(processor, QUESTION)
    inputs = processor(images=[data.image], text=[prompt], return_tensors="pt")
    if data.encoder_output is None:  # FastV changes nothing before the LLM: compute the features once
        data.encoder_output = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], return_dict=True
        )
    out = {}
    for method in LLM_METHODS + STAGED_METHODS:
        try:
            patched = apply_method(model, processor, method, ratio=ratio,
                                   **({"layer": layer} if method in LLM_METHODS else {}))  # fmt: skip
        except ValueError:  # a layer-average schedule out of reach at this R (methods.schedule)
            continue
        with patched as handle:
            if method in ("fastv", "pdrop", "sparsevlm"):
                text = {k: v for k, v in inputs.items() if k != "pixel_values"}
                model(**text, mm_encoder_outputs={"image": data.encoder_output}, logits_to_keep=1)
            else:  # GlobalCom²'s allocation needs the [CLS] scores of the tower pass
                model(**inputs, logits_to_keep=1)
            out[method] = handle.plans[0]
    return out


def _row(group: str, photo: str, method: str, ratio: float, metrics: dict, **extra: Any) -> dict[str, Any]:
    return {"group": group, "photo": photo, "method": method, "ratio": ratio, **extra, **metrics}


def run_eval(
    out_dir: str | Path = "globalcom2_eval_out",
    *,
    photos: tuple[str, ...] | None = None,
    ratios: tuple[float, ...] = (0.5, 0.25, 0.1),
    quick: bool = False,
    llm: bool = True,
    progress: bool = True,
    log: Callable[..., None] = print,
    command: str = "globalcom2 eval",
) -> dict[str, Any]:
    """Run the sweep, write CSV + Markdown + plots to ``out_dir`` and return the summary.

    Args:
        out_dir: output folder (created).
        photos: names from :data:`globalcom2.demo.photos.PHOTOS` (default: all of them; ``quick``: astronaut).
        ratios: retention ratios R.
        quick: one photo, two ablation settings, one random draw (for tests; seconds).
        llm: also run FastV and GlobalCom² + FastV on the tiny random LLM.
        progress: show a tqdm progress bar.
        log: where to print messages.
        command: the command line recorded in the report.
    """
    from ..demo.photos import PHOTOS, load_photo
    from ..loading import load_model_and_processor
    from .report import write_outputs

    if photos is None:
        photos = ("astronaut",) if quick else tuple(PHOTOS)
    unknown = [p for p in photos if p not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; available: {', '.join(PHOTOS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"GlobalCom² eval -> {out}/\n{STANDIN_LABEL}")
    settings = ablation_settings(quick)
    draws = 1 if quick else 5
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    allocation_detail: dict[str, Any] = {}
    model, processor = load_model_and_processor("standin")  # the llava_next stand-in
    steps = [(p, None) for p in photos] + [(p, r) for p in photos for r in ratios]
    bar = _progress(len(steps), progress)
    data: dict[str, PhotoData] = {}
    for photo in photos:
        bar.set_postfix_str(f"{photo}: vision tower")
        data[photo] = photo_data(model, processor, photo, load_photo(photo))
        bar.update(1)
    for p_idx, photo in enumerate(photos):
        d = data[photo]
        for r_idx, ratio in enumerate(ratios):
            bar.set_postfix_str(f"{photo} R={ratio:.0%}")
            plans = vision_plans(d, ratio, random_draws=draws, seed=1000 * p_idx + r_idx)
            for method, method_plans in plans.items():
                for k, plan in enumerate(method_plans):
                    rows.append(_row("method", photo, method, ratio, plan_metrics(plan, d.reference), draw=k))
            detail = {m: ps[0] for m, ps in plans.items()}
            if llm:
                for method, plan in llm_plans(model, processor, d, ratio).items():
                    rows.append(_row("llm", photo, method, ratio, plan_metrics(plan, d.reference), draw=0))
                    detail[method] = plan
            for (alloc, scoring, score), plan in ablation_plans(d, ratio, settings).items():
                rows.append(_row("ablation", photo, "globalcom2", ratio, plan_metrics(plan, d.reference),
                                 allocation=alloc, scoring=scoring, score=score))  # fmt: skip
            allocation_detail[f"{photo}@{ratio}"] = {
                "photo": photo, "ratio": ratio, "grid": list(d.grid),
                "crop_mass": [round(float(m), 5) for m in d.reference.crop_mass],
                "share": {m: [round(float(k) / max(int(n), 1), 5) for k, n in
                              zip(p.crop_keep_counts, p.crop_valid_counts, strict=True)]
                          for m, p in detail.items()},
            }  # fmt: skip
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {
        "note": STANDIN_LABEL,
        "command": command,
        "photos": {p: {"size_hw": list(data[p].size), "grid": list(data[p].grid)} for p in photos},
        "ratios": list(ratios),
        "ablation_settings": [list(s) for s in settings],
        "random_draws": draws,
        "llm": llm,
        "seconds": round(elapsed, 1),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "allocation": allocation_detail,
    }
    files = write_outputs(out, rows, summary)
    log(f"finished in {elapsed:.0f} s; wrote {', '.join(str(f) for f in files)}")
    return {**summary, "rows": rows, "files": [str(f) for f in files]}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from ..extras import optional_imports

    with optional_imports("progress bars (or pass --no-progress)"):
        from tqdm.auto import tqdm

    return tqdm(total=total, desc="globalcom2 eval", unit="step")


def mean_or_nan(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.fmean(vals) if vals else float("nan")


# -------------------------------------------------------------------------------------------- other families


EQ7_CAVEAT = (
    " This family scores by Eq. 7 (minus the cosine to the tile mean), not by a [CLS] row: the reference maps are "
    "built from those scores, which are not a probability distribution, so its mass and cosine columns are NOT "
    "meaningful here (the rows show that every method runs and how its counts behave)."
)


def family_label(family: str, importance: str = "cls") -> str:
    """The report's note for a stand-in family other than LLaVA-NeXT (``importance``: the family's score)."""
    from ..demo.tiny_families import RANDOM_TOWER_FAMILIES

    caveat = EQ7_CAVEAT if importance != "cls" else ""
    if family in RANDOM_TOWER_FAMILIES:
        tower = ("its own vision tower class with RANDOM weights (the DINOv2 stand-in does not fit it), a tiny "
                 "randomly initialised LLM")  # fmt: skip
        measure = ("agreement with the same random model's uncompressed image (what a random encoder finds "
                   "distinctive), NOT what a trained encoder finds important and NOT accuracy")  # fmt: skip
    else:
        tower = ("a DINOv2 ViT-S/14 tower with real weights in place of the family's own tower, a tiny randomly "
                 "initialised LLM")  # fmt: skip
        measure = "fidelity measures, NOT accuracy"
    return (
        f"Family {family}: its offline stand-in (stock transformers classes, {tower}). Every method runs through "
        "globalcom2.apply_method on that model, the vision-side ones by the family's own vision pass. "
        "Metrics compare kept tokens with the tower's own scores (as the family pools them per LLM token) and the "
        f"projector's output of the uncompressed image: {measure}. LLM-side methods run inside the random LLM: "
        "mechanism only." + caveat
    )


class _Capture:
    """Per-tile scores and projector outputs of one uncompressed vision pass, taken off a patched model."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []


@torch.no_grad()
def family_reference(model: Any, processor: Any, image: Any) -> tuple[Reference, Plan] | None:
    """The reference maps of one image on any family: GlobalCom²'s own scoring at R = 1 with softmax [CLS] scores
    (per LLM token, as the family pools them) and the projector's output per tile; None for an image the family
    encodes as one tile (nothing to allocate between crops)."""
    from ..adapters import adapter_for
    from ..adapters.qwen import QwenAdapter
    from ..apply import apply

    if issubclass(adapter_for(model), QwenAdapter):
        return _native_reference(model, processor, image)
    cap = _Capture()
    inner = getattr(model, "model", model)  # Llama 4: the tower and the projector hang off the model itself
    # the module whose output is one feature per LLM token of each tile (Llama 4: the tower's own pixel-shuffle
    # adapter; its multi_modal_projector runs later, in the model's forward)
    vision_adapter = getattr(getattr(inner, "vision_model", None), "vision_adapter", None)
    projector = vision_adapter or getattr(inner, "multi_modal_projector", None) or inner.connector
    hook = projector.register_forward_hook(lambda m, a, out: cap.features.append(out.detach()))
    try:
        with apply(model, processor, ratio=1.0, score="softmax", scoring="local") as handle:
            adapter = handle.adapter
            take = adapter.take_scores

            def record(h: Any) -> torch.Tensor:
                scores = take(h)
                cap.scores.append(scores.detach())
                return scores

            setattr(adapter, "take_scores", record)  # noqa: B010 - this instance only, for this one pass
            plan = adapter.plan_for_image(handle, image)
            del adapter.take_scores
    finally:
        hook.remove()
    if not plan.num_crops:
        return None
    scores = cap.scores[0].float()
    feats = torch.cat(cap.features).float()
    feats = feats.reshape(scores.shape[0], -1, feats.shape[-1])
    from ..adapters.anyres import AnyresAdapter

    n = plan.num_crops
    if isinstance(adapter, AnyresAdapter) or getattr(adapter, "thumbnail_first", False):  # thumbnail first
        thumb, crops, crop_feats = scores[0], scores[1 : 1 + n], feats[1 : 1 + n]
    else:  # InternVL's tile order: crops, then the thumbnail
        thumb, crops, crop_feats = scores[n], scores[:n], feats[:n]
    if crop_feats.shape[1] != crops.shape[1]:
        return None  # features at another resolution than the plan's cells: no reference
    ref = build_reference(thumb, crops, crop_feats, grid=plan.grid, valid_box=plan.valid_box)
    return ref, plan


@torch.no_grad()
def _native_reference(model: Any, processor: Any, image: Any) -> tuple[Reference, Plan] | None:
    """The reference maps of one image on a native-resolution family (Qwen-VL): the merger's output of the
    uncompressed image and the family's own scores of it (:func:`~globalcom2.evaluation.metrics.native_reference`);
    None for an image of one region."""
    from ..adapters.qwen import region_tokens_of
    from ..apply import apply

    seen: list[tuple[list, list]] = []
    with apply(model, processor, ratio=1.0) as handle:
        adapter: Any = handle.adapter
        plan_images = adapter.plan_images

        def record(features: Any, grids: Any) -> Any:
            seen.append(([f.detach() for f in features], [tuple(g) for g in grids]))
            return plan_images(features, grids)

        setattr(adapter, "plan_images", record)  # noqa: B010 - this instance only, for this one pass
        plan = adapter.plan_for_image(handle, image)
        del adapter.plan_images
        region_tokens = region_tokens_of(adapter.config)
    if not plan.num_crops or plan.num_crops == 1:
        return None
    features, grids = seen[0]
    return native_reference(features[0], grids[0], region_tokens), plan


def run_family_eval(
    out_dir: str | Path,
    family: str,
    *,
    photos: tuple[str, ...] | None = None,
    ratios: tuple[float, ...] = (0.5, 0.25, 0.1),
    quick: bool = False,
    llm: bool = True,
    progress: bool = True,
    log: Callable[..., None] = print,
    command: str = "globalcom2 eval",
) -> dict[str, Any]:
    """`globalcom2 eval --family F` for a stand-in family other than LLaVA-NeXT: every method F runs
    (:func:`globalcom2.methods.method_support`) x R on the shipped photos, and GlobalCom²'s two quick ablation
    settings, written as :func:`run_eval` writes them. Photos F encodes as a single tile are left out (said in the
    log and the summary)."""
    from ..demo.photos import PHOTOS, load_photo
    from ..loading import load_model_and_processor
    from ..methods import METHODS, check_method, method_support
    from .report import write_outputs
    from .visual import method_plan

    if photos is None:
        photos = ("rocket",) if quick else tuple(PHOTOS)
    unknown = [p for p in photos if p not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; available: {', '.join(PHOTOS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, processor = load_model_and_processor("standin", family=family)
    from ..adapters import adapter_for

    note = family_label(family, adapter_for(model)(model, processor, GlobalComConfig()).importance)
    log(f"GlobalCom² eval ({family}) -> {out}/\n{note}")
    from ..methods.pruner import num_llm_layers

    layers = num_llm_layers(model)
    methods = [m for m in METHODS if method_support(m, family) is None]
    if not llm:
        methods = [m for m in methods if METHODS[m].stage == "vision"]
    settings = ablation_settings(True)
    draws = 1 if quick else 3
    rows: list[dict[str, Any]] = []
    detail_all: dict[str, Any] = {}
    info: dict[str, Any] = {}
    skipped: list[str] = []
    refused: dict[str, str] = {}  # method -> why the stand-in refused it with the method's default options
    bar = _progress(len(photos) * len(ratios), progress)
    for photo in photos:
        image = load_photo(photo)
        found = family_reference(model, processor, image)
        if found is None:
            skipped.append(photo)
            log(f"{photo}: one tile on {family}, left out")
            bar.update(len(ratios))
            continue
        ref, full = found
        info[photo] = {"size_hw": [image.height, image.width], "grid": list(full.grid)}
        for ratio in ratios:
            bar.set_postfix_str(f"{photo} R={ratio:.0%}")
            detail: dict[str, Plan] = {}
            for method in methods:
                try:
                    check_method(method, family, ratio=ratio, num_layers=layers)
                except ValueError:  # a layer-average schedule out of reach at this R on the stand-in's LLM
                    continue
                if method in refused:
                    continue
                group = "method" if METHODS[method].stage == "vision" else "llm"
                seeds = range(draws) if method == "random" else (None,)
                for k, seed in enumerate(seeds):
                    options = {} if seed is None else {"seed": seed}
                    try:
                        plan = method_plan(
                            model, processor, image, method, ratio, question=QUESTION, **options
                        )
                    except UnsupportedModelError as err:  # refused on this stand-in with its default options
                        refused[method] = str(err)  # (e.g. Qwen3.5: FastV's scoring layer is a linear one)
                        log(f"{method}: refused on the {family} stand-in, left out: {err}")
                        break
                    rows.append(_row(group, photo, method, ratio, plan_metrics(plan, ref), draw=k))
                    detail.setdefault(method, plan)
            for allocation, scoring, score in settings:
                plan = method_plan(model, processor, image, "globalcom2", ratio, question=QUESTION,
                                   allocation=allocation, scoring=scoring, score=score)  # fmt: skip
                rows.append(_row("ablation", photo, "globalcom2", ratio, plan_metrics(plan, ref),
                                 allocation=allocation, scoring=scoring, score=score))  # fmt: skip
            detail_all[f"{photo}@{ratio}"] = {
                "photo": photo, "ratio": ratio, "grid": list(full.grid),
                "crop_mass": [round(float(m), 5) for m in ref.crop_mass],
                "share": {m: [round(float(k) / max(int(n), 1), 5) for k, n in
                              zip(p.crop_keep_counts, p.crop_valid_counts, strict=True)]
                          for m, p in detail.items() if p.crop_keep_counts.numel() == len(ref.crop_mass)},
            }  # fmt: skip
            bar.update(1)
    bar.close()
    if not info:
        raise ValueError(f"every photo is a single tile on {family}; pick larger or wider photos")
    elapsed = time.perf_counter() - t0
    summary = {
        "note": note, "command": command, "family": family, "photos": info, "single_tile_photos": skipped,
        "ratios": list(ratios), "ablation_settings": [list(s) for s in settings], "random_draws": draws,
        "llm": llm, "methods": [m for m in methods if m not in refused], "methods_refused": refused,
        "seconds": round(elapsed, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "allocation": detail_all,
    }  # fmt: skip
    files = write_outputs(out, rows, summary)
    log(f"finished in {elapsed:.0f} s; wrote {', '.join(str(f) for f in files)}")
    return {**summary, "rows": rows, "files": [str(f) for f in files]}
