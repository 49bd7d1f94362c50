"""SparseVLM and GlobalCom² + SparseVLM inside a real (tiny, random) LLaVA-NeXT LLM, against plain computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.methods import apply_method
from globalcom2.methods.layout import image_token_layout
from globalcom2.methods.schedule import sparsevlm_layers, sparsevlm_schedule
from tests.adapters.families import plan_key
from tests.conftest import PROMPT, batch_inputs, random_image, sweep
from tests.methods.conftest import assert_llm_batch_equals_alone
from tests.methods.plain_llm import embed, head_mean_rows, staged_forward, top_by_score


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A tiny LLaVA-NeXT with an 8-layer LLM (pruning layers 1, 2, 4: stages from layers 2, 3, 5)."""
    from globalcom2.demo.tiny_model import build_tiny_llava_next, load_tiny

    return load_tiny(build_tiny_llava_next(tmp_path_factory.mktemp("tiny8_sv"), text_layers=8, seed=4))


def _recycled(d: int) -> int:
    return (int(int(0.3 * d + 1e-12) + 1) // 10 + 1) if d > 0 else 0


def _plain_raters(h0, image):
    """Text tokens after the image whose mean (over image tokens) softmax relevance is above the mean."""
    img = [i for i, v in enumerate(image) if v]
    text = list(range(img[-1] + 1, len(image)))
    rel = torch.zeros(len(text))
    for v in img:
        rel += (h0[0, text].float() @ h0[0, v].float()).softmax(-1)
    rel /= len(img)
    chosen = [t for t, r in zip(text, rel.tolist(), strict=True) if r > float(rel.mean())]
    return chosen or text


def _plain_dpc(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Density peaks with kNN (k = clusters), ties to the earlier token; each cluster's mean."""
    m, d = x.shape
    dist = torch.stack([torch.stack([(x[i] - x[j]).norm() for j in range(m)]) for i in range(m)]) / math.sqrt(
        d
    )
    dens = [math.exp(-float((dist[i].sort().values[:clusters] ** 2).mean())) for i in range(m)]
    dmax = float(dist.max())
    parent = []
    for i in range(m):
        higher = [float(dist[i, j]) for j in range(m) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        parent.append(min(higher) if higher else dmax)
    score = [p * q for p, q in zip(parent, dens, strict=True)]
    centers = sorted(sorted(range(m), key=lambda i: (-score[i], i))[:clusters])
    groups: dict[int, list[int]] = {c: [] for c in centers}
    for i in range(m):
        best = centers[min(range(len(centers)), key=lambda c: (float(dist[i, centers[c]]), c))]
        groups[i if i in groups else best].append(i)
    return torch.stack([x[groups[c]].mean(0) for c in centers])


def _plain_sparsevlm(model, inputs, sched, budget="schedule", scale=13.5):
    """SparseVLM's published rule, one sample, head by head (module docstring of globalcom2.methods.sparsevlm)."""
    lm = model.model.language_model
    n0 = int((inputs["input_ids"] == model.config.image_token_id).sum())
    info = {"scores": [], "ranks": [], "raters": None}

    def on_start(seq):
        raters = _plain_raters(embed(model, inputs), seq.image)
        info["raters"] = raters
        seq.extra["rater"] = [i in raters for i in range(len(seq.origin))]

    def select(stage, seq, positions):
        raters = [i for i, r in enumerate(seq.extra["rater"]) if r]
        rows = head_mean_rows(lm, seq.extra["score_layer"], seq.extra["score_input"], seq.extra["score_positions"],
                              raters)  # fmt: skip
        score = rows.mean(0)
        info["scores"].append(score)
        images = [i for i, v in enumerate(seq.image) if v]
        n = len(images)
        if budget == "rank":
            rank = int(np.linalg.matrix_rank(rows[:, images].double().numpy()))
            info["ranks"].append(rank)
            d = 0 if rank >= n else n - min(int(scale * rank), n - 1)
        else:
            target = min(int(n0 * sched.shares[stage]), n)
            d = next((d for d in range(n + 1) if n - d + _recycled(d) <= target), None)
        recycle = d is not None
        d = n - target if d is None else d  # nothing fits with recycling: plain deletions, none recycled
        kept = top_by_score(score.tolist(), images, n - d)
        deleted = [i for i in images if i not in kept]
        text = [i for i, v in enumerate(seq.image) if not v]
        if not deleted or not recycle:
            return sorted(kept + text), None, -1
        m = int(0.3 * len(deleted) + 1e-12) + 1
        picked = top_by_score(score.tolist(), deleted, m)
        extras = _plain_dpc(seq.h[0, picked].float(), _recycled(len(deleted))).to(seq.h.dtype)
        after = max(i for i in kept + text if i <= images[-1])
        return sorted(kept + text), extras, after

    logits, kept, decisions = staged_forward(
        model, inputs, list(sched.boundaries), 1, select, on_start=on_start
    )
    return logits, kept, decisions, info


def test_schedule():
    assert sparsevlm_layers(32) == (2, 6, 15)
    assert sparsevlm_layers(8) == (1, 2, 4) and sparsevlm_layers(4) == (0, 1, 2)
    for layers, ratio in ((32, 0.5), (32, 0.25), (32, 0.1), (8, 0.5)):
        sched = sparsevlm_schedule(layers, ratio)
        assert sched.average == pytest.approx(ratio, abs=1e-12)
        assert sched.boundaries == tuple(v + 1 for v in sparsevlm_layers(layers))
        rho = sched.shares[0]
        assert sched.shares == pytest.approx((rho, rho**2, rho**3))
    with pytest.raises(ValueError, match="out of reach for sparsevlm"):
        sparsevlm_schedule(8, 0.2)
    with pytest.raises(ValueError, match="increasing layers"):
        sparsevlm_schedule(8, 0.5, layers=[3, 2, 5])


@pytest.mark.parametrize("ratio", [0.5, 0.35])
def test_matches_plain_reimplementation(tiny8, ratio):
    """Raters, scores, kept sets, recycled tokens, per-layer counts and logits equal the plain rule's."""
    model, processor = tiny8
    inputs = batch_inputs(processor, [(120, 200)], seeds=[7])
    with apply_method(model, processor, "sparsevlm", ratio=ratio) as gc, torch.no_grad():
        ours = model(**inputs).logits
        sched = gc.adapter.schedule
        stage_scores = list(gc.adapter.pruner.state.stage_scores)
        plan = gc.plans[0]
        assert model.config.text_config._attn_implementation == "sdpa"
    plain, kept, decisions, info = _plain_sparsevlm(model, inputs, sched)
    n = plan.num_tokens_full
    assert list(plan.layer_tokens) == sched.layer_counts(n)  # kept + recycled = the schedule, layer by layer
    assert all(extras is not None for _, extras, _ in decisions)  # recycling happened at every stage
    for ours_s, plain_s in zip(stage_scores, info["scores"], strict=True):
        torch.testing.assert_close(ours_s[0, : plain_s.numel()], plain_s, atol=1e-6, rtol=1e-5)
    # the plan's masks are the plain run's last-stage image tokens (mapped to cells by the token layout)
    image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().reshape(-1).tolist()
    lay = image_token_layout(gc.adapter.geometry((120, 200)))
    kept_final = [k for k, pos in enumerate(image_pos) if pos in set(kept[-1])]
    thumb = {int(lay.cell[k]) for k in kept_final if lay.region[k] == 0}
    crops = {int(lay.cell[k]) for k in kept_final if lay.region[k] > 0}
    assert set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()) == thumb
    assert set(plan.crops_mask.reshape(-1).nonzero().reshape(-1).tolist()) == crops
    torch.testing.assert_close(ours, plain, atol=5e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], plain[:, -1], atol=1e-4)


def test_first_stage_scores_equal_eager_attention(tiny8):
    """Stage 1's rater rows are the eager model's attention maps of the pruning layer, averaged over raters."""
    model, processor = tiny8
    inputs = batch_inputs(processor, [(100, 180)], seeds=[1])
    with apply_method(model, processor, "sparsevlm", ratio=0.5) as gc, torch.no_grad():
        model(**inputs)
        ours = gc.adapter.pruner.state.stage_scores[0][0]
        layer = gc.adapter.schedule.boundaries[0] - 1
    from globalcom2.demo.tiny_model import load_tiny

    eager = load_tiny(model.name_or_path, attn_implementation="eager")[0]
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions[layer][0].mean(0)  # (S, S)
    image = (inputs["input_ids"][0] == model.config.image_token_id).tolist()
    raters = _plain_raters(embed(model, inputs), image)
    torch.testing.assert_close(ours, maps[raters].mean(0), atol=1e-6, rtol=1e-5)


def test_rank_budget(tiny8):
    """budget='rank': kept = min(floor(scale * rank(P)), n - 1), P the raters' rows over the image tokens."""
    model, processor = tiny8
    inputs = batch_inputs(processor, [(120, 200)], seeds=[5])
    with (
        apply_method(model, processor, "sparsevlm", ratio=0.5, budget="rank", scale=3.0) as gc,
        torch.no_grad(),
    ):
        ours = model(**inputs).logits
        plan = gc.plans[0]
        sched = gc.adapter.schedule
    plain, kept, decisions, info = _plain_sparsevlm(model, inputs, sched, budget="rank", scale=3.0)
    n = plan.num_tokens_full
    first = plan.layer_tokens[sched.boundaries[0]]
    d = n - min(int(3.0 * info["ranks"][0]), n - 1)
    assert first == n - d + _recycled(d)
    torch.testing.assert_close(ours, plain, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["sparsevlm", "globalcom2+sparsevlm"])
def test_generate_batch_and_remove(tiny8, method):
    model, processor = tiny8
    layers = assert_llm_batch_equals_alone(
        model, processor, method, [(100, 180), (200, 64)], lambda p: p.layer_tokens, ratio=0.5
    )
    assert layers[0] != layers[1]


def test_globalcom2_sparsevlm_budgets(tiny8):
    """Every stage's per-region counts are GlobalCom²'s budget counts at the stage's share, split by r_j * N_j;
    r_j equal GlobalCom²'s own plan; inside each region the kept tokens are the top by the raters' scores."""
    from globalcom2.core.budget import budget_counts, split_budget

    model, processor = tiny8
    inputs = batch_inputs(processor, [(120, 200)], seeds=[2])
    ratio = 0.5
    with globalcom2.apply(model, processor, ratio=ratio) as gc, torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        ref = gc.plans[0]
    with (
        apply_method(model, processor, "globalcom2+sparsevlm", ratio=ratio, recycle=0.0) as gc,
        torch.no_grad(),
    ):
        model(**inputs)
        plan = gc.plans[0]
        sched = gc.adapter.schedule
    torch.testing.assert_close(plan.crop_ratios, ref.crop_ratios)
    share = sched.shares[-1]
    valid = ref.crop_valid_counts
    thumb, crops = budget_counts(int(ref.thumbnail_mask.numel()), int(valid.sum()), share)
    assert int(plan.thumbnail_mask.sum()) == thumb
    assert (
        plan.crop_keep_counts.tolist()
        == split_budget(crops, ref.crop_ratios.double() * valid, valid).tolist()
    )
    newlines = plan.num_tokens_full - int(ref.thumbnail_mask.numel()) - int(valid.sum())
    assert plan.num_tokens == thumb + crops + newlines  # no recycling: exactly the budgets plus the newlines


def test_bad_options(tiny8):
    model, processor = tiny8
    for options, match in (({"budget": "svd"}, "`budget` must be one of"), ({"scale": 0}, "`scale` must be"),
                           ({"recycle": 1.0}, r"`recycle` must be in \[0, 1\)"),
                           ({"layers": [5, 6, 9]}, "increasing layers")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            apply_method(model, processor, "sparsevlm", ratio=0.5, **options)
    with pytest.raises(ValueError, match="out of reach for sparsevlm"):
        apply_method(model, processor, "sparsevlm", ratio=0.1)
    with pytest.raises(ValueError, match="`budget` must be 'schedule'"):
        apply_method(model, processor, "globalcom2+sparsevlm", ratio=0.5, budget="rank")
    with pytest.raises(TypeError, match="unknown option"):
        apply_method(model, processor, "sparsevlm", ratio=0.5, lam=0.5)
    assert getattr(model, "_globalcom2_handle", None) is None


@pytest.mark.parametrize("method", sweep(["sparsevlm", "globalcom2+sparsevlm"], ["sparsevlm"]))
def test_a_left_padded_row_with_fewer_raters_equals_it_alone(tiny8, method):
    """Regression: the shorter prompt of a batch is left-padded and has fewer raters than the longer one, so the
    filler slots of its rater rows index its padding, where no key is visible. Those rows are zero (they were NaN,
    which made every score of the row NaN and its kept set arbitrary); the row gets what it gets alone."""
    model, processor = tiny8
    image = random_image(100, 180, seed=1)
    prompts = [PROMPT, PROMPT.replace("?", ", in one long sentence that names every object and its colour?")]
    alone = [processor(images=[image], text=[prompt], return_tensors="pt") for prompt in prompts]
    image_id = model.config.image_token_id
    raters = [len(_plain_raters(embed(model, a), (a["input_ids"][0] == image_id).tolist())) for a in alone]
    assert raters[0] < raters[1]  # the padded row has filler rater slots
    batch = processor(images=[image, image], text=prompts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"][0].all())  # the short prompt is left-padded
    with apply_method(model, processor, method, ratio=0.5) as gc, torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        assert bool(torch.isfinite(gc.adapter.pruner.last_scores).all())
        kept = [plan_key(plan) for plan in gc.plans]
        for i in range(len(prompts)):
            assert torch.equal(
                model.generate(**alone[i], max_new_tokens=4, do_sample=False)[:, -4:], gen[i : i + 1]
            )
            assert plan_key(gc.plans[0]) == kept[i], i
