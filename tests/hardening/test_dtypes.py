"""dtype matrix: bf16 and fp16 models give the fp32 plan except at near-ties, and keep their own dtype.

A reduced-precision tower changes the token scores slightly, so a token whose fp32 score sits right at a crop's
selection cut may flip. The allowed flips ("near-ties", documented in docs/errors.md) are defined from measured
quantities: with delta = 2 x the largest score change of that tile between the two dtypes, a token may only change
side if its fp32 rank is within W of the cut, W = (tokens whose fp32 score is within delta of the cut) + (change of
the tile's keep count). Everything else must match exactly; counts in budget mode must match exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import globalcom2
import globalcom2.adapters.family as family
import globalcom2.adapters.llava_next as llava_next
from globalcom2.adapters.anyres import AnyresGeometry, plan_anyres, valid_box
from globalcom2.config import GlobalComConfig
from globalcom2.core.layout import grid_to_tiles
from globalcom2.core.ranking import descending_rank
from globalcom2.core.resize import bilinear_resize
from globalcom2.core.select import holistic_scores
from tests.conftest import PROMPT, random_image

SIZES = [(100, 180), (180, 100), (150, 150), (40, 200), (300, 310), (61, 183)]
LOW = [torch.bfloat16, torch.float16]


def assert_near_tie_only(keep_a, keep_b, score_a, score_b, valid, where):
    """Rows are tiles. keep/valid: Bool (T, N); score_*: (T, N) selection scores of the fp32 (a) and low (b) run."""
    for t in range(keep_a.shape[0]):
        v = valid[t]
        if not bool(v.any()):
            continue
        a, b = keep_a[t] & v, keep_b[t] & v
        diff = a ^ b
        if not bool(diff.any()):
            continue
        sa, sb = score_a[t].double(), score_b[t].double()
        delta = 2 * float((sa[v] - sb[v]).abs().max()) + 1e-12
        k_a, k_b = int(a.sum()), int(b.sum())
        kept_min = float(sa[a].min()) if k_a else float("inf")
        dropped_max = float(sa[v & ~a].max()) if bool((v & ~a).any()) else float("-inf")
        cut = (
            (kept_min + dropped_max) / 2
            if k_a and bool((v & ~a).any())
            else (kept_min if k_a else dropped_max)
        )
        near = int(((sa - cut).abs() <= delta)[v].sum())
        window = near + abs(k_a - k_b)
        rank = descending_rank(sa.masked_fill(~v, float("-inf")))
        bad = diff & ((rank < k_a - window) | (rank >= k_a + window))
        assert not bool(bad.any()), (
            f"{where} tile {t}: tokens {bad.nonzero().reshape(-1).tolist()} flipped "
            f"outside the near-tie window (k={k_a}->{k_b}, window={window}, delta={delta:.3g})"
        )


def _selection_scores(plan, tile_scores, alpha=0.5):
    """Thumbnail scores (1, N) and the holistic crop scores (n, N) the planner ranked, rebuilt from tile scores
    (per tile: the crop's own scores and the thumbnail map resized onto the valid box, Eq. 5)."""
    rows, cols = plan.grid
    g = plan.patches_per_side
    n = rows * cols
    top, bottom, left, right = plan.valid_box
    valid_grid = torch.zeros(rows * g, cols * g, dtype=torch.bool)
    valid_grid[top:bottom, left:right] = True
    glob = torch.zeros(rows * g, cols * g, dtype=torch.float64)
    glob[top:bottom, left:right] = bilinear_resize(tile_scores[0].reshape(g, g), (bottom - top, right - left))
    valid = grid_to_tiles(valid_grid, rows, cols).reshape(n, -1)
    sub = grid_to_tiles(glob, rows, cols).reshape(n, -1)
    hol = holistic_scores(tile_scores[1:], sub, valid, scoring="holistic", alpha=alpha)
    return tile_scores[:1], hol, valid


def _plan(tile_scores, grid, size, g, mode):
    """The LLaVA-NeXT plan of one image from its tile scores (thumbnail first), as the adapter makes it."""
    box = valid_box(size[0], size[1], grid[0] * g, grid[1] * g)
    geo = AnyresGeometry(tuple(grid), g, box, (box[1] - box[0], box[3] - box[2]))
    plan, _ = plan_anyres(tile_scores, geo, GlobalComConfig(ratio=0.25, mode=mode), official_order=True)
    return plan


def _run(tiny_clip_dir, dtype, mode, monkeypatch):
    """Plans, per-image tile scores, output dtypes of the tiny model loaded in ``dtype``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from globalcom2.demo.tiny_model import load_tiny

    model, processor = load_tiny(tiny_clip_dir, dtype=dtype)
    recorded = []
    real = family.cls_attention_scores

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        recorded.append(out)
        return out

    monkeypatch.setattr(family, "cls_attention_scores", record)
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as gc:
        inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            try:
                feats = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output
            except RuntimeError as err:  # an op this CPU build lacks for the dtype
                pytest.skip(f"{dtype} not supported by this CPU build: {err}")
            recorded.clear()
            logits = model(**inputs).logits
        plans, forward_scores = gc.plans, torch.cat(recorded)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False) if mode == "budget" else None
    counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 64) for s in SIZES]
    scores = torch.split(forward_scores, counts)
    monkeypatch.undo()
    return {"plans": plans, "scores": scores, "feats": feats, "logits": logits, "out": out}


@pytest.fixture(scope="module")
def fp32_runs(tiny_clip_dir):
    mp = pytest.MonkeyPatch()
    try:
        return {mode: _run(tiny_clip_dir, torch.float32, mode, mp) for mode in ("budget", "reference")}
    finally:
        mp.undo()


@pytest.mark.parametrize("mode", ["budget", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_plans_match_fp32_up_to_near_ties(tiny_clip_dir, fp32_runs, dtype, mode, monkeypatch):
    ref = fp32_runs[mode]
    low = _run(tiny_clip_dir, dtype, mode, monkeypatch)
    # Outputs keep the model's dtype.
    assert all(f.dtype == dtype for f in low["feats"]) and low["logits"].dtype == dtype
    if mode == "budget":
        assert low["out"].shape == ref["out"].shape
    flips = 0
    for k, (pa, pb) in enumerate(zip(ref["plans"], low["plans"], strict=True)):
        where = f"{dtype} {mode} image {k} {SIZES[k]}"
        assert pa.grid == pb.grid and pa.valid_box == pb.valid_box, where
        if mode == "budget":  # a function of the image size only
            assert pa.num_tokens == pb.num_tokens and int(pa.crops_mask.sum()) == int(pb.crops_mask.sum())
        # The planner itself is dtype-blind: the low-precision plan is exactly the core's plan of its scores.
        again = _plan(low["scores"][k], pb.grid, SIZES[k], pb.patches_per_side, mode)
        assert torch.equal(again.crops_mask, pb.crops_mask) and torch.equal(
            again.thumbnail_mask, pb.thumbnail_mask
        )
        torch.testing.assert_close(pb.crop_ratios, pa.crop_ratios, atol=2e-2, rtol=0)
        ta, ca, valid = _selection_scores(pa, ref["scores"][k])
        tb, cb, _ = _selection_scores(pb, low["scores"][k])
        assert_near_tie_only(pa.thumbnail_mask.reshape(1, -1), pb.thumbnail_mask.reshape(1, -1), ta, tb,
                             torch.ones_like(pa.thumbnail_mask.reshape(1, -1)), where + " thumbnail")  # fmt: skip
        rows, cols = pa.grid
        keep_a = grid_to_tiles(pa.crops_mask, rows, cols).reshape(rows * cols, -1)
        keep_b = grid_to_tiles(pb.crops_mask, rows, cols).reshape(rows * cols, -1)
        assert_near_tie_only(keep_a, keep_b, ca, cb, valid, where + " crops")
        flips += int((pa.thumbnail_mask ^ pb.thumbnail_mask).sum() + (pa.crops_mask ^ pb.crops_mask).sum())
    print(f"{dtype} {mode}: {flips} kept-token flips vs fp32 over {len(SIZES)} images")


def test_near_tie_checker_rejects_a_real_difference():
    """The checker must fail on a flip far from the cut (so the test above can fail)."""
    s = torch.arange(10.0).flip(0)[None]  # 9, 8, ..., 0: token 0 is the best
    keep = torch.zeros(1, 10, dtype=torch.bool)
    keep[0, :3] = True
    near = keep.clone()
    near[0, 2], near[0, 3] = False, True  # swap at the cut, with scores within delta
    assert_near_tie_only(keep, near, s, s + torch.tensor([[0, 0, -0.6, 0.6, 0, 0, 0, 0, 0, 0]]),
                         torch.ones_like(keep), "near")  # fmt: skip
    far = keep.clone()
    far[0, 0], far[0, 9] = False, True  # the best token dropped for the worst
    with pytest.raises(AssertionError, match="flipped outside the near-tie window"):
        assert_near_tie_only(keep, far, s, s + 0.01, torch.ones_like(keep), "far")


def test_real_dinov2_tower_in_bf16_and_fp16_plans_like_fp32():
    """The real stand-in ViT (DINOv2-S/14, trained weights) on a real photo (a wide cut: padded 1x2 grid)."""
    pytest.importorskip("onnx")
    from globalcom2.adapters.towers import describe_tower
    from globalcom2.core.scores import cls_attention_scores
    from globalcom2.demo.encoder import load_standin_vision_tower, standin_image_processor
    from globalcom2.demo.photos import load_photo

    try:
        photo = load_photo("astronaut").crop((0, 100, 512, 330))  # 512 x 230 px
        fp32 = load_standin_vision_tower(336)
        towers = {dt: copy.deepcopy(fp32).to(dt) for dt in LOW}  # the cached tower is shared: copy it
        towers[torch.float32] = fp32
    except (FileNotFoundError, ImportError, ValueError) as err:
        pytest.skip(f"stand-in tower or photo unavailable: {err}")
    batch = standin_image_processor()(images=[photo], return_tensors="pt")
    pv, size = batch["pixel_values"][0], tuple(int(x) for x in batch["image_sizes"][0])
    scores = {}
    for dt, tower in towers.items():
        info = describe_tower(tower)
        with torch.no_grad():
            hidden = tower(pv.to(dt), output_hidden_states=True).hidden_states[-2]
            s = cls_attention_scores(hidden, norm=info.norm, q_proj=info.q_proj, k_proj=info.k_proj,
                                     num_heads=info.num_heads, num_prefix_tokens=info.num_prefix_tokens)  # fmt: skip
        assert s.dtype == torch.float32 and torch.isfinite(s).all()
        scores[dt] = s
    grid = llava_next.image_grid(size, standin_image_processor().image_grid_pinpoints, 336)
    assert grid == (1, 2) and pv.shape[0] == 3
    for mode in ("budget", "reference"):
        g = int(round(scores[torch.float32].shape[1] ** 0.5))
        pa = _plan(scores[torch.float32], grid, size, g, mode)
        for dt in LOW:
            pb = _plan(scores[dt], grid, size, g, mode)
            ta, ca, valid = _selection_scores(pa, scores[torch.float32])
            tb, cb, _ = _selection_scores(pb, scores[dt])
            where = f"dinov2 {dt} {mode}"
            assert_near_tie_only(pa.thumbnail_mask.reshape(1, -1), pb.thumbnail_mask.reshape(1, -1), ta, tb,
                                 torch.ones_like(pa.thumbnail_mask.reshape(1, -1)), where)  # fmt: skip
            keep_a = grid_to_tiles(pa.crops_mask, *grid).reshape(2, -1)
            keep_b = grid_to_tiles(pb.crops_mask, *grid).reshape(2, -1)
            assert_near_tie_only(keep_a, keep_b, ca, cb, valid, where)
            flips = int((pa.thumbnail_mask ^ pb.thumbnail_mask).sum() + (pa.crops_mask ^ pb.crops_mask).sum())
            kept = int(pa.thumbnail_mask.sum() + pa.crops_mask.sum())
            assert flips <= 0.1 * kept, where  # near-ties are few
            print(f"{where}: {flips} of {kept} kept tokens differ from fp32; "
                  f"max |score diff| {float((scores[dt] - scores[torch.float32]).abs().max()):.3g}")  # fmt: skip
