"""`globalcom2 eval --task defects`: does compression keep the evidence of a small defect?

A labelled, offline test of what each pre-LLM method keeps. Mosaics of simulated textile images (the optional
``conformal-clip-data`` wheel: nominal images, images with a small *local* defect, images with a *global* defect)
go through LLaVA-NeXT's anyres tiling (a 2x2 mosaic of 250 px images gives a 2x2 crop grid plus the thumbnail of
the whole mosaic) and the DINOv2 stand-in tower, once per mosaic (:func:`globalcom2.evaluation.runner.photo_data`,
the tiles of a mosaic in one batch). Every method's plan at every R is then computed from those scores by the same
planner functions the adapters call (:func:`globalcom2.evaluation.runner.vision_plans`).

**Detector** (PatchCore-style nearest neighbour; it never sees the scores the methods select with). A bank holds
the L2-normalised crop-token features (the LLM's feature layer) of mosaics built only from nominal *training*
images. A token's anomaly score is its cosine distance to the nearest bank token. The image score of a method is
the max (local defects) or the mean (global defects) over the crop tokens the method *kept*: a dropped defect token
is a missed defect. Only the crops are scored: the thumbnail shows each textile image at half the crops'
resolution, where a local defect spot covers about a third of a patch, and scoring it only adds nominal noise to
the max (every method keeps thumbnail tokens too; they are simply not looked at). Pooling keeps no token as such:
its pooled crop tokens (the means the LLM receives, :func:`globalcom2.methods.vision.pool_packed`) are scored
against a bank of nominal crop tokens pooled the same way at the same R. PruMerge(+) is scored on the tokens it
keeps; its merging of pruned neighbours into them is not modelled. At R = 100 % every ratio-driven method keeps
(or pools into) every token, so its scores equal the uncompressed ones exactly (a test holds this).

**Metrics.** Nominal test mosaics are the negatives, mosaics with one defect tile the positives: AUROC
(Mann-Whitney, ties count one half) and the detection rate at a fixed false-alarm rate (the share of positives
scoring above the ``(1 - far)`` point of the negatives: a point of the ROC curve), each with a stratified,
paired bootstrap 95 % interval (the same resamples for every method and R); the share of detected defect
mosaics whose highest-scoring kept token lies in the defect tile; the share of defect tiles whose allocated
ratio (paper Eq. 4, the crops' r_j weighted by their overlap with the tile) is above / below R under GlobalCom².

What the number is: how well a nearest-neighbour detector on the stand-in's *kept tokens* finds a defect. What it
is not: an LVLM's answer, or accuracy on any benchmark.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.anyres import AnyresGeometry
from ..core.layout import tiles_to_grid
from ..core.plan import Plan
from ..methods.vision import PoolingPlan, plan_pooling, pool_packed
from .defects_report import UNCOMPRESSED, write_defects
from .runner import _progress, photo_data, vision_plans

__all__ = [
    "DEFECT_KINDS", "LAYOUTS", "STANDIN_DEFECTS_LABEL", "Mosaic", "auroc", "bootstrap_summary", "detection_rate",
    "make_mosaics", "nearest_distances", "run_defects",
]  # fmt: skip

#: Defect kinds of the data set and the image statistic the detector uses for each (issue 24; docs/eval.md).
DEFECT_KINDS: dict[str, str] = {"local": "max", "global": "mean"}
#: Mosaic layouts (rows, cols) of textile images, used in turn.
LAYOUTS: tuple[tuple[int, int], ...] = ((2, 2), (2, 3))
TILE_PX = 250  # the data set's images are 250 x 250
STANDIN_DEFECTS_LABEL = (
    "Vision tower: DINOv2 ViT-S/14 at 336 px (real weights), an offline STAND-IN for LLaVA-NeXT's CLIP ViT-L/14-336, "
    "in LLaVA-NeXT's anyres geometry. Detector: nearest-neighbour distance of the tokens a method keeps to a bank "
    "of nominal tokens (PatchCore-style). The numbers say how well that detector finds a small defect in what a "
    "method keeps; they are NOT an LVLM's answer and NOT benchmark accuracy."
)


@dataclass(frozen=True)
class Mosaic:
    """One test or training image: textile images pasted row-major on a ``layout`` grid.

    Attributes:
        name: unique, e.g. ``"test-local-007"``.
        layout: ``(rows, cols)`` of textile images.
        files: source images, row-major, relative to the data root (``"nominal/textile_0001.jpg"``).
        kind: ``"nominal"`` or a key of :data:`DEFECT_KINDS`.
        defect_tile: row-major index of the defect image, -1 for a nominal mosaic.
    """

    name: str
    layout: tuple[int, int]
    files: tuple[str, ...]
    kind: str
    defect_tile: int


def data_root() -> Path:
    """Folder holding ``nominal/``, ``local/`` and ``global/`` (the ``conformal-clip-data`` wheel)."""
    from ..extras import optional_imports

    with optional_imports("the defect benchmark"):
        import conformal_clip_data

    return Path(conformal_clip_data.nominal_dir()).parent


def _shuffled(root: Path, kind: str, generator: torch.Generator) -> list[str]:
    files = sorted(f"{kind}/{p.name}" for p in (root / kind).glob("*.jpg"))
    return [files[i] for i in torch.randperm(len(files), generator=generator).tolist()]


def make_mosaics(
    root: Path,
    *,
    num_train: int,
    num_test: int,
    kinds: Sequence[str] = tuple(DEFECT_KINDS),
    layouts: Sequence[tuple[int, int]] = LAYOUTS,
    seed: int = 0,
) -> tuple[list[Mosaic], list[Mosaic]]:
    """``(train, test)`` mosaics; no source image is used twice, so train and test never share one.

    Training mosaics (the detector's bank) are nominal. The test set has ``num_test`` nominal mosaics and
    ``num_test`` per defect kind, each with exactly one defect image at a random tile. Layouts alternate.
    """
    generator = torch.Generator().manual_seed(seed)
    nominal = _shuffled(root, "nominal", generator)
    defects = {kind: _shuffled(root, kind, generator) for kind in kinds}
    taken = 0

    def build(name: str, index: int, kind: str) -> Mosaic:
        nonlocal taken
        layout = layouts[index % len(layouts)]
        count = layout[0] * layout[1]
        files = nominal[taken : taken + count]
        taken += count
        if len(files) < count:
            raise ValueError(f"not enough nominal images for {name}: lower num_train / num_test")
        tile = -1
        if kind != "nominal":
            tile = int(torch.randint(count, (1,), generator=generator))
            files[tile] = defects[kind][index]
        return Mosaic(name, layout, tuple(files), kind, tile)

    train = [build(f"train-{i:03d}", i, "nominal") for i in range(num_train)]
    test = [build(f"test-{kind}-{i:03d}", i, kind) for kind in ("nominal", *kinds) for i in range(num_test)]
    return train, test


def load_mosaic(mosaic: Mosaic, root: Path) -> Any:
    """The mosaic as an RGB PIL image of ``(cols * 250) x (rows * 250)`` pixels."""
    from PIL import Image

    rows, cols = mosaic.layout
    canvas = Image.new("RGB", (cols * TILE_PX, rows * TILE_PX))
    for index, name in enumerate(mosaic.files):
        with Image.open(root / name) as im:
            canvas.paste(im.convert("RGB").resize((TILE_PX, TILE_PX)), ((index % cols) * TILE_PX,
                                                                       (index // cols) * TILE_PX))  # fmt: skip
    return canvas


# ----------------------------------------------------------------------------------------- token layout


def packed_features(features: torch.Tensor, geo: AnyresGeometry) -> torch.Tensor:
    """``(g*g + H*W, D)``: the thumbnail's tokens, then the valid crop grid in raster order (HF's packing, no
    newlines), from the tower's ``(1 + n, g*g, D)`` features."""
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    crops = features[1:].reshape(rows * cols, g, g, -1).movedim(-1, 0)  # (D, n, g, g)
    grid = tiles_to_grid(crops, rows, cols).movedim(0, -1)  # (rows*g, cols*g, D)
    return torch.cat([features[0], grid[top:bottom, left:right].reshape(-1, features.shape[-1])]).float()


def crop_mask(plan: Plan) -> torch.Tensor:
    """Bool ``(H*W,)``: the plan's kept tokens of the valid crop grid, raster order."""
    top, bottom, left, right = plan.valid_box
    return plan.crops_mask[top:bottom, left:right].reshape(-1)


def cell_tiles(geo: AnyresGeometry, layout: tuple[int, int]) -> torch.Tensor:
    """Long ``(H*W,)``: the textile image (row-major index in ``layout``) under the centre of each valid crop-grid
    cell (the valid crop grid covers the whole mosaic)."""
    rows, cols = layout
    top, bottom, left, right = geo.box
    height, width = bottom - top, right - left
    y = ((torch.arange(height) * 2 + 1) * rows) // (2 * height)  # row of the cell centre, exact integers
    x = ((torch.arange(width) * 2 + 1) * cols) // (2 * width)
    return (y[:, None] * cols + x[None, :]).reshape(-1)


def crop_overlap(geo: AnyresGeometry, layout: tuple[int, int]) -> torch.Tensor:
    """``(num_images, rows*cols)``: how many valid crop-grid cells of each crop lie on each textile image."""
    g = geo.g
    top, bottom, left, right = geo.box
    tile = cell_tiles(geo, layout)
    ys, xs = torch.meshgrid(torch.arange(top, bottom), torch.arange(left, right), indexing="ij")
    crop = ((ys // g) * geo.grid[1] + xs // g).reshape(-1)
    out = torch.zeros(layout[0] * layout[1], geo.grid[0] * geo.grid[1])
    out.index_put_((tile, crop), torch.ones(tile.shape[0]), accumulate=True)
    return out


# ------------------------------------------------------------------------------------------- detector


def normalised(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def build_bank(tokens: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """At most ``size`` L2-normalised rows of ``tokens``, drawn uniformly without replacement (raster order kept)."""
    if tokens.shape[0] > size:
        pick = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
        tokens = tokens[pick.sort().values]
    return normalised(tokens)


def nearest_distances(tokens: torch.Tensor, bank: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``(T,)`` cosine distance of each token to its nearest bank token (bank rows already normalised)."""
    x = normalised(tokens)
    return torch.cat([1 - (x[i : i + chunk] @ bank.T).amax(-1) for i in range(0, x.shape[0], chunk)])


def pooled_crops(features: torch.Tensor, plan: PoolingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled crop tokens (K, D), first valid crop-grid cell of each (K,))`` of pooling's plan."""
    num_thumb = int(plan.thumbnail_cover.max()) + 1
    pooled = pool_packed(features, plan, newline=False)[num_thumb:]
    top, bottom, left, right = plan.valid_box
    cover = plan.crops_cover[top:bottom, left:right].reshape(-1)
    first = torch.full((pooled.shape[0],), cover.shape[0], dtype=torch.long)
    return pooled, first.scatter_reduce(0, cover, torch.arange(cover.shape[0]), reduce="amin")


def token_record(distances: torch.Tensor, cells: torch.Tensor, tiles: torch.Tensor) -> dict:
    """Image scores of the crop tokens a method hands on: max, mean, and the textile image where the max lies."""
    top = int(distances.argmax())  # the first of equal maxima (raster order)
    return {
        "score_max": float(distances.max()),
        "score_mean": float(distances.mean()),
        "flagged_tile": int(tiles[int(cells[top])]),
        "tokens_scored": int(distances.shape[0]),
    }


# -------------------------------------------------------------------------------------------- metrics


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """AUROC = P(positive > negative) + P(tie) / 2 (Mann-Whitney), over the last dim; batched over leading dims."""
    diff = pos.unsqueeze(-1) - neg.unsqueeze(-2)
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((-1, -2))


def detection_rate(pos: torch.Tensor, neg: torch.Tensor, far: float) -> torch.Tensor:
    """Share of positives scoring above the threshold that at most ``far`` of the negatives exceed."""
    k = math.floor(far * neg.shape[-1])  # negatives allowed above the threshold
    threshold = neg.sort(-1, descending=True).values[..., k]
    return (pos > threshold.unsqueeze(-1)).double().mean(-1)


def bootstrap_summary(
    pos: torch.Tensor, neg: torch.Tensor, far: float, pos_index: torch.Tensor, neg_index: torch.Tensor
) -> dict[str, float]:
    """AUROC and detection rate with percentile 95 % intervals over the given resamples ``(B, n)``."""
    out = {"auroc": float(auroc(pos, neg)), "detection": float(detection_rate(pos, neg, far))}
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for name, values in (("auroc", auroc(pos[pos_index], neg[neg_index])),
                         ("detection", detection_rate(pos[pos_index], neg[neg_index], far))):  # fmt: skip
        lo, hi = torch.quantile(values, q).tolist()
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


# ---------------------------------------------------------------------------------------------- sweep


@dataclass
class _Tower:
    """What the sweep keeps of one mosaic after its tower pass (features are dropped once scored)."""

    mosaic: Mosaic
    data: Any  # runner.PhotoData
    features: torch.Tensor  # packed (T, D)


def _tower(model: Any, processor: Any, mosaic: Mosaic, root: Path) -> _Tower:
    data = photo_data(model, processor, mosaic.name, load_mosaic(mosaic, root))
    assert data.features is not None
    features = packed_features(data.features, data.geometry)
    data.features = data.image = None  # keep only the scores and geometry
    return _Tower(mosaic, data, features)


def score_mosaic(
    tower: _Tower,
    ratios: Sequence[float],
    banks: dict[Any, torch.Tensor],
    *,
    index: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (one per method x R, plus uncompressed) and GlobalCom²'s per-image allocation of one test mosaic."""
    geo, mosaic = tower.data.geometry, tower.mosaic
    tiles = cell_tiles(geo, mosaic.layout)
    cells = torch.arange(tiles.shape[0])
    distances = nearest_distances(tower.features[geo.g**2 :], banks[None])
    base = {"mosaic": mosaic.name, "kind": mosaic.kind, "layout": "x".join(map(str, mosaic.layout)),
            "defect_tile": mosaic.defect_tile}  # fmt: skip
    rows = [{**base, "method": UNCOMPRESSED, "ratio": 1.0,
             **token_record(distances, cells, tiles)}]  # fmt: skip
    allocation = []
    overlap = crop_overlap(geo, mosaic.layout)
    for r_idx, ratio in enumerate(ratios):
        plans = vision_plans(tower.data, ratio, random_draws=1, seed=index * len(ratios) + r_idx)
        for method, (plan, *_) in plans.items():
            if isinstance(plan, PoolingPlan):
                pooled, first = pooled_crops(tower.features, plan)
                record = token_record(nearest_distances(pooled, banks[ratio]), first, tiles)
            else:
                keep = crop_mask(plan)
                record = token_record(distances[keep], cells[keep], tiles)
            rows.append({**base, "method": method, "ratio": ratio, "llm_share": plan.keep_ratio, **record})
        tile_ratio = (overlap @ plans["globalcom2"][0].crop_ratios.float()) / overlap.sum(-1).clamp_min(1)
        allocation += [{**base, "ratio": ratio, "tile": t, "tile_ratio": float(tile_ratio[t])}
                       for t in range(tile_ratio.shape[0])]  # fmt: skip
    return rows, allocation


def pooled_banks(
    train: list[_Tower], ratios: Sequence[float], size: int, seed: int
) -> dict[Any, torch.Tensor]:
    """The detector's banks: ``None`` -> the crop tokens of the nominal training mosaics; ``R`` -> the same tokens
    pooled as pooling does at R."""
    banks: dict[float | None, torch.Tensor] = {
        None: build_bank(torch.cat([t.features[t.data.geometry.g**2 :] for t in train]), size, seed)
    }
    for ratio in ratios:
        pooled = [pooled_crops(t.features, plan_pooling(t.data.geometry, ratio))[0] for t in train]
        banks[ratio] = build_bank(torch.cat(pooled), size, seed)
    return banks


def summarise(
    rows: list[dict[str, Any]],
    allocation: list[dict[str, Any]],
    *,
    ratios: Sequence[float],
    far: float,
    num_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per defect kind x method x R (and uncompressed): AUROC, detection rate, localisation, allocation."""
    out = []
    nominal = sorted({r["mosaic"] for r in rows if r["kind"] == "nominal"})
    for kind, statistic in DEFECT_KINDS.items():
        positives = sorted({r["mosaic"] for r in rows if r["kind"] == kind})
        if not positives:
            continue
        generator = torch.Generator().manual_seed(seed)  # the same resamples for every method and R (paired)
        pos_index = torch.randint(len(positives), (num_boot, len(positives)), generator=generator)
        neg_index = torch.randint(len(nominal), (num_boot, len(nominal)), generator=generator)
        alloc = [a for a in allocation if a["kind"] == kind and a["tile"] == a["defect_tile"]]
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != UNCOMPRESSED))
        settings = [(UNCOMPRESSED, 1.0)] + [(m, r) for r in ratios for m in methods]
        for method, ratio in settings:
            table = {r["mosaic"]: r for r in rows if r["method"] == method and r["ratio"] == ratio}
            key = f"score_{statistic}"
            pos = torch.tensor([table[m][key] for m in positives], dtype=torch.float64)
            neg = torch.tensor([table[m][key] for m in nominal], dtype=torch.float64)
            found = [table[m]["flagged_tile"] == table[m]["defect_tile"] for m in positives]
            row = {"kind": kind, "statistic": statistic, "method": method, "ratio": ratio,
                   "num_defect": len(positives), "num_nominal": len(nominal),
                   **bootstrap_summary(pos, neg, far, pos_index, neg_index),
                   "localised": sum(found) / len(found),
                   "llm_share": sum(table[m].get("llm_share", 1.0) for m in positives) / len(positives)}  # fmt: skip
            if method == "globalcom2":
                ratios_here = [a["tile_ratio"] for a in alloc if a["ratio"] == ratio]
                row["defect_tile_up"] = sum(t > ratio * (1 + 1e-6) for t in ratios_here) / len(ratios_here)
                row["defect_tile_down"] = sum(t < ratio * (1 - 1e-6) for t in ratios_here) / len(ratios_here)
                row["defect_tile_ratio"] = sum(ratios_here) / len(ratios_here) / ratio  # mean r_tile / R
            out.append(row)
    return out


def _load() -> float | None:
    """1-minute load average (other jobs sharing the CPUs), None where the OS has none."""
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    """Hash of every image score (to compare two runs at a glance)."""
    text = "\n".join(f"{r['mosaic']} {r['method']} {r['ratio']} {r['score_max']!r} {r['score_mean']!r}"
                     for r in rows)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_defects(
    out_dir: str | Path = "globalcom2_defects_out",
    *,
    ratios: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05),
    num_train: int = 24,
    num_test: int = 40,
    kinds: Sequence[str] = tuple(DEFECT_KINDS),
    layouts: Sequence[tuple[int, int]] = LAYOUTS,
    bank_size: int = 24576,
    far: float = 0.05,
    num_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
    write: bool = True,
    log: Callable[..., None] = print,
    command: str = "globalcom2 eval --task defects",
) -> dict[str, Any]:
    """Run the defect benchmark and (``write``) store CSV, JSON, Markdown and the figure in ``out_dir``.

    Args:
        out_dir: output folder (created).
        ratios: retention ratios R of the compressed runs (the uncompressed run is always added).
        num_train: nominal training mosaics (the detector's bank).
        num_test: test mosaics per class (nominal and each defect kind).
        kinds: defect kinds tested (keys of :data:`DEFECT_KINDS`).
        layouts: mosaic layouts (rows, cols), alternating.
        bank_size: at most this many bank tokens (a seeded uniform draw), which bounds the detector's cost.
        far: false-alarm rate of the detection rate.
        num_boot: bootstrap resamples.
        seed: seeds the mosaics, the bank draw, the random method and the bootstrap.
        progress: show a tqdm progress bar (one step per mosaic).
        write: write the outputs (tests may skip it).
        log: where to print messages.
        command: the command line recorded in the report.

    Returns:
        ``{"rows", "allocation", "summary", "meta", "files"}``.
    """
    from ..loading import load_model_and_processor

    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown:
        raise ValueError(f"`kinds` must be among {sorted(DEFECT_KINDS)}, got {unknown}")
    root = data_root()
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), _load()
    log(f"GlobalCom² defect benchmark -> {out_dir}/\n{STANDIN_DEFECTS_LABEL}")
    train_set, test_set = make_mosaics(root, num_train=num_train, num_test=num_test, kinds=kinds,
                                       layouts=layouts, seed=seed)  # fmt: skip
    model, processor = load_model_and_processor("standin")  # LLaVA-NeXT geometry
    bar = _progress(len(train_set) + len(test_set), progress)
    train = []
    for mosaic in train_set:
        bar.set_postfix_str(f"{mosaic.name}: vision tower")
        train.append(_tower(model, processor, mosaic, root))
        bar.update(1)
    banks = pooled_banks(train, ratios, bank_size, seed)
    del train
    rows: list[dict[str, Any]] = []
    allocation: list[dict[str, Any]] = []
    for index, mosaic in enumerate(test_set):
        bar.set_postfix_str(f"{mosaic.name}: tower + {len(ratios)} R")
        more_rows, more_alloc = score_mosaic(
            _tower(model, processor, mosaic, root), ratios, banks, index=index
        )
        rows += more_rows
        allocation += more_alloc
        bar.update(1)
    bar.close()
    summary = summarise(rows, allocation, ratios=ratios, far=far, num_boot=num_boot, seed=seed)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # this process's CPU time: what a machine without other jobs would need
    meta = {
        "note": STANDIN_DEFECTS_LABEL,
        "command": command,
        "ratios": list(ratios),
        "num_train": num_train,
        "num_test_per_class": num_test,
        "kinds": {k: DEFECT_KINDS[k] for k in kinds},
        "layouts": [list(x) for x in layouts],
        "bank_tokens": int(banks[None].shape[0]),
        "far": far,
        "num_boot": num_boot,
        "seed": seed,
        "fingerprint": _fingerprint(rows),
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu, 1),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_start_end": [load0, _load()],
        },
    }
    files: list[str] = []
    if write:
        files = [str(f) for f in write_defects(Path(out_dir), rows, allocation, summary, meta)]
        log(f"finished in {elapsed:.0f} s; wrote {', '.join(files)}")
    return {"rows": rows, "allocation": allocation, "summary": summary, "meta": meta, "files": files}
