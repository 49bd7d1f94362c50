"""PruMerge / PruMerge+ on a real tiny LLaVA-NeXT, against a plain re-implementation of the published rule.

The plain version below is written from the paper (Sec. 3.2-3.3, Algorithm 1) and the authors' public defaults, with
Python loops and float64 math on the tower's weights: [CLS] attention head by head (and, for ``attention="heads"``,
HF's own eager attention maps as a second witness), ``numpy.percentile`` quartiles, the spatial samples of
PruMerge+, and the k-nearest-key merge token by token. The library's vectorised version must give the same kept
sets and the same features.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from globalcom2.adapters.anyres import valid_box
from globalcom2.adapters.errors import UnsupportedModelError
from globalcom2.adapters.llava_next import image_grid
from globalcom2.methods import METHODS, apply_method
from globalcom2.methods.prumerge import (
    PRUMERGE_OPTIONS,
    PruMergeAdapter,
    PruMergePlan,
    iqr_outliers,
    plan_prumerge,
    spatial_samples,
)
from globalcom2.viz.numbers import panel_numbers, panel_text
from tests.conftest import PROMPT, assert_sweep_plans_match, module_state, random_image
from tests.methods.plain_prumerge import plain_keep as _plain_keep
from tests.methods.plain_prumerge import plain_merge as _plain_merge

SIZES = [(100, 180), (120, 130), (180, 100)]
SHARPEN = 12.0  # the tiny random tower's [CLS] attention is flat; a sharper one gives tiles several outliers


def _sharpen(model):
    """Scale the last vision layer's query weights: a real (modified) model whose tiles have several outliers."""
    with torch.no_grad():
        model.model.vision_tower.encoder.layers[-1].self_attn.q_proj.weight.mul_(SHARPEN)
    return model


@pytest.fixture()
def sharp(tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    model, processor = load_tiny(tiny_clip_dir, attn_implementation="eager")
    return _sharpen(model), processor


# ------------------------------------------------------------------------------------------- plain version


def _g(model) -> int:
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def _tiles(model, size) -> list[list[int]]:
    """Valid token indices (tile raster order) of the thumbnail and every crop of an image of ``size``."""
    g = _g(model)
    rows, cols = image_grid(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    top, bottom, left, right = valid_box(size[0], size[1], rows * g, cols * g)
    out = [list(range(g * g))]
    for r in range(rows):
        for c in range(cols):
            out.append([ty * g + tx for ty in range(g) for tx in range(g)
                        if top <= r * g + ty < bottom and left <= c * g + tx < right])  # fmt: skip
    return out


@torch.no_grad()
def _plain_tower(model, inputs, attention: str):
    """float64 [CLS] attention over the patches, keys and tokens y of every tile, from the tower's weights."""
    tower = model.model.vision_tower
    size = tuple(inputs["image_sizes"][0].tolist())
    n = len(_tiles(model, size))
    out = tower(inputs["pixel_values"][0, :n], output_hidden_states=True, output_attentions=True)
    x = out.hidden_states[-2].double()  # the last layer's input = the features LLaVA reads (layer -2)
    layer = tower.encoder.layers[-1]
    ln, att = layer.layer_norm1, layer.self_attn
    xn = F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)
    q = xn @ att.q_proj.weight.double().T + att.q_proj.bias.double()
    k = xn @ att.k_proj.weight.double().T + att.k_proj.bias.double()
    d = q.shape[-1]
    if attention == "full":  # the public code: one attention over the whole width
        a = torch.softmax(torch.einsum("td,tsd->ts", q[:, 0], k) / math.sqrt(d), dim=-1)
    else:  # head by head, then the mean over heads
        heads = model.config.vision_config.num_attention_heads
        dh = d // heads
        per_head = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            per_head.append(
                torch.softmax(torch.einsum("td,tsd->ts", q[:, 0, sl], k[:, :, sl]) / math.sqrt(dh), -1)
            )
        a = torch.stack(per_head).mean(0)
        # second witness: HF's eager attention maps
        torch.testing.assert_close(a.float(), out.attentions[-1][:, :, 0].mean(1), atol=1e-5, rtol=1e-4)
    return a[:, 1:], k[:, 1:], out.hidden_states[-2][:, 1:].double()


def _plain_image(
    model, inputs, *, plus: bool, attention: str = "full", k: int = 32, extra_token: bool = True
):
    """The plain version's kept sets per tile and the token run handed to the LLM."""
    size = tuple(inputs["image_sizes"][0].tolist())
    tiles = _tiles(model, size)
    a, keys, y = _plain_tower(model, inputs, attention)
    keeps, outliers, merged, extras = [], [], [], []  # extras: None for a tile that pruned nothing
    for t, valid in enumerate(tiles):
        keep, m = _plain_keep(a[t], valid, plus)
        mt, et = _plain_merge(a[t], keys[t], y[t], valid, keep, k)
        keeps.append(keep)
        outliers.append(m)
        merged.append(mt)
        extras.append(et if extra_token and len(keep) < len(valid) else None)
    proj = model.model.multi_modal_projector
    g = _g(model)
    rows, cols = image_grid(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    top, bottom, left, right = valid_box(size[0], size[1], rows * g, cols * g)
    seq = [merged[0][p] for p in sorted(keeps[0])] + [e for e in extras[:1] if e is not None]
    newline = model.model.image_newline.double()
    for yy in range(top, bottom):
        for xx in range(left, right):
            t, p = 1 + (yy // g) * cols + xx // g, (yy % g) * g + xx % g
            if p in keeps[t]:
                seq.append(merged[t][p])
        seq.append(None)  # newline (not projected)
    seq += [e for e in extras[1:] if e is not None]
    with torch.no_grad():
        rows_out = [newline if s is None else proj(s.float()[None]).double()[0] for s in seq]
    return keeps, outliers, torch.stack(rows_out)


def _encode(model, processor, size, seed=0):
    inputs = processor(images=[random_image(*size, seed=seed)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    return inputs, feats[0]


def _plan_keeps(plan: PruMergePlan, g: int) -> list[set[int]]:
    rows, cols = plan.grid
    crops = plan.crops_mask.reshape(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g)
    return [set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist())] + [
        set(c.nonzero().reshape(-1).tolist()) for c in crops
    ]


# ------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("attention", ["full", "heads"])
@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_kept_sets_and_features_equal_the_plain_rule(sharp, method, attention):
    model, processor = sharp
    g = _g(model)
    plus = method == "prumerge+"
    seen_outliers = set()
    for i, size in enumerate(SIZES):
        with apply_method(model, processor, method, ratio=0.25, attention=attention) as gc:
            inputs, feats = _encode(model, processor, size, seed=i)
            plan = gc.plans[0]
        keeps, outliers, expected = _plain_image(model, inputs, plus=plus, attention=attention)
        assert isinstance(plan, PruMergePlan) and plan.mode == method
        assert _plan_keeps(plan, g) == keeps, (size, attention)
        assert plan.outlier_counts.tolist() == outliers
        assert plan.num_tokens == feats.shape[0] == expected.shape[0]
        torch.testing.assert_close(feats.double(), expected, atol=1e-5, rtol=1e-4)
        seen_outliers |= set(outliers)
    assert max(seen_outliers) >= 3  # the rule was exercised beyond the one-token fallback


@pytest.mark.parametrize("k", [1, 5])
def test_merge_with_small_k_and_without_the_extra_token(sharp, k):
    """k neighbours really are the k nearest keys (not every other token), and the remainder token is optional."""
    model, processor = sharp
    size = (100, 180)
    with apply_method(model, processor, "prumerge", ratio=0.1, k=k, extra_token=False) as gc:
        inputs, feats = _encode(model, processor, size)
        plan = gc.plans[0]
    assert plan.extra_tokens == 0 and plan.neighbours == k
    _, _, expected = _plain_image(model, inputs, plus=False, k=k, extra_token=False)
    torch.testing.assert_close(feats.double(), expected, atol=1e-5, rtol=1e-4)


def test_rule_pieces_on_hand_made_scores():
    scores = torch.tensor([[0.0, 0.1, 0.1, 0.2, 0.1, 5.0, 0.1, 0.0], [1.0] * 8])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 5] = False  # a padded cell is never an outlier and not in the quartiles
    out = iqr_outliers(scores, valid)
    q1, q3 = np.percentile([0.0, 0.1, 0.1, 0.2, 0.1, 0.1, 0.0], [25, 75])
    expected0 = [
        bool(v and s > q3 + 1.5 * (q3 - q1))
        for s, v in zip(scores[0].tolist(), valid[0].tolist(), strict=True)
    ]
    assert out[0].tolist() == expected0 and out[0, 3]  # 0.2 is the only outlier once 5.0 is padding
    assert out[1].tolist() == [True] + [False] * 7  # no outlier: the top token, ties to the earlier one
    from globalcom2.adapters.anyres import AnyresGeometry

    geo = AnyresGeometry((1, 2), 2, (0, 2, 0, 4), (2, 4))  # thumbnail + 2 crops of 4 tokens
    tiles = torch.tensor([[0.0, 0.0, 0.0, 9.0], [1.0] * 4, [0.0, 0.0, 0.0, 9.0]])
    plan = plan_prumerge(tiles, geo, plus=False)[0]
    assert plan.outlier_counts.tolist() == [1, 1, 1]  # what the outlier step kept ...
    assert plan.fallback_tiles.tolist() == [False, True, False]  # ... the middle tile by the fallback only
    assert plan.summary()["fallback_tiles"] == [False, True, False]
    # the public code's PruMerge+ samples for N = 576, m = 32: arange(0, 575, (576 // 32) // 3 = 6)
    n = 576
    outliers = torch.zeros(1, n, dtype=torch.bool)
    outliers[0, :32] = True
    samples = spatial_samples(outliers, torch.ones(1, n, dtype=torch.bool))
    assert samples[0].nonzero().reshape(-1).tolist() == list(range(0, 575, 6))


def test_a_tile_that_prunes_nothing_hands_on_no_remainder_token():
    """PruMerge+ with m > N/6 outliers samples every position (step 1): nothing is pruned, so no (zero) token."""
    from globalcom2.adapters.anyres import AnyresGeometry

    geo = AnyresGeometry((1, 2), 4, (0, 4, 0, 8), (4, 8))
    scores = torch.zeros(3, 16)
    scores[:, 12:] = 1.0  # 4 outliers in every tile (Q1 = 0, Q3 = 0.25): step = (16 // 4) // 3 = 1
    plan, keep, valid = plan_prumerge(scores, geo, plus=True)
    assert keep.all() and plan.extra_tiles.tolist() == [False, False, False] and plan.extra_tokens == 0
    assert (
        plan.outlier_counts.tolist() == [4, 4, 4] and plan.num_tokens == 3 * 16 + 4
    )  # + one newline per row
    plan, keep, _ = plan_prumerge(scores, geo, plus=False)
    assert keep.sum(-1).tolist() == [4, 4, 4] and plan.extra_tokens == 3
    assert plan.num_tokens == 12 + 4 + 3


def test_generate_and_forward_use_the_merged_tokens(sharp):
    """forward resizes the placeholder run to the plan's count; its logits equal the unpatched model fed the
    plain version's tokens; generate hands back the caller's prompt plus the new tokens."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = sharp
    inputs = processor(images=[random_image(120, 130, seed=4)], text=[PROMPT], return_tensors="pt")
    with apply_method(model, processor, "prumerge+", ratio=0.5) as gc, torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        plan = gc.plans[0]
    n_full = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert plan.num_tokens_full == n_full and plan.num_tokens < n_full
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n_full + plan.num_tokens
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert int(out[0, inputs["input_ids"].shape[1]]) == int(logits[0, -1].argmax())
    # the unpatched model, fed a prompt with plan.num_tokens placeholders and the plain version's tokens
    _, _, expected = _plain_image(model, inputs, plus=True)
    ids = inputs["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero()[0])
    short = torch.cat([ids[:first], ids.new_full((plan.num_tokens,), model.config.image_token_id),
                       ids[first + n_full :]])[None]  # fmt: skip
    enc = BaseModelOutputWithPooling(pooler_output=[expected.float()])
    with torch.no_grad():
        plain = model(
            input_ids=short, attention_mask=torch.ones_like(short), mm_encoder_outputs={"image": enc}
        )
    torch.testing.assert_close(logits, plain.logits, atol=1e-4, rtol=1e-4)


def test_batch_equals_each_alone(sharp):
    model, processor = sharp
    images = [random_image(100, 180, seed=1), random_image(120, 130, seed=2), random_image(180, 100, seed=3)]
    with apply_method(model, processor, "prumerge", ratio=0.25) as gc, torch.no_grad():
        batch_in = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
        batch_out = model.generate(**batch_in, max_new_tokens=3, do_sample=False)[
            :, batch_in["input_ids"].shape[1] :
        ]
        feats = model.model.get_image_features(
            batch_in["pixel_values"], batch_in["image_sizes"]
        ).pooler_output
        batch_plans = list(gc.plans)
        for i, image in enumerate(images):
            one = processor(images=[image], text=[PROMPT], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)[:, one["input_ids"].shape[1] :]
            assert torch.equal(batch_out[i], alone[0]), i
            f1 = model.model.get_image_features(one["pixel_values"], one["image_sizes"]).pooler_output[0]
            torch.testing.assert_close(feats[i], f1, atol=1e-6, rtol=1e-5)
            p1, pb = gc.plans[0], batch_plans[i]
            assert torch.equal(p1.thumbnail_mask, pb.thumbnail_mask) and torch.equal(
                p1.crops_mask, pb.crops_mask
            )
            assert p1.num_tokens == pb.num_tokens


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_remove_restores_bit_exactly(tiny, method):
    model, processor = tiny
    inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    state, proc_attrs = module_state(model), sorted(vars(processor))
    with apply_method(model, processor, method, ratio=0.1) as gc:
        assert gc.method == method and type(gc.adapter) is PruMergeAdapter
        # the processor is not patched: the adaptive count is applied inside forward/generate
        again = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
        assert torch.equal(again["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] < before.shape[1]
    assert module_state(model) == state and sorted(vars(processor)) == proc_attrs
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_registry_options_and_ratio(tiny):
    model, processor = tiny
    for method in ("prumerge", "prumerge+"):
        spec = METHODS[method]
        assert spec.stage == "vision" and not spec.uses_ratio and spec.options == PRUMERGE_OPTIONS
    plans = {}
    for ratio in (0.5, 0.1):  # adaptive: R is recorded, not used
        with apply_method(model, processor, "prumerge", ratio=ratio) as gc:
            assert gc.method_options == {"ratio": ratio, **PRUMERGE_OPTIONS}
            _encode(model, processor, (100, 180))
            plans[ratio] = gc.plans[0]
    assert torch.equal(plans[0.5].crops_mask, plans[0.1].crops_mask)
    assert plans[0.5].num_tokens == plans[0.1].num_tokens


def test_single_tile_image_is_not_compressed(tiny):
    model, processor = tiny
    with apply_method(model, processor, "prumerge", ratio=0.1) as gc:
        _, feats = _encode(model, processor, (30, 30))
        plan = gc.plans[0]
    if plan.grid == (0, 0):
        assert plan.num_tokens == plan.num_tokens_full == feats.shape[0]
    else:  # the processor tiled even this size: still a valid compressed plan
        assert plan.num_tokens == feats.shape[0]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k`"),
        ({"k": 2.5}, TypeError, "`k` must be an int"),
        ({"k": True}, TypeError, "`k` must be an int"),
        ({"attention": "mean"}, ValueError, "`attention` must be one of"),
        ({"extra_token": "yes"}, TypeError, "`extra_token` must be a bool"),
        ({"layer": 2}, TypeError, "unknown option"),
        ({"ratio": 0.0}, ValueError, "ratio"),
    ],
)
def test_bad_options_are_clear_errors_and_patch_nothing(tiny, options, error, match):
    model, processor = tiny
    state = module_state(model)
    kwargs = {"ratio": 0.25, **options}
    with pytest.raises(error, match=match):
        apply_method(model, processor, "prumerge", **kwargs)
    assert module_state(model) == state and "_globalcom2_handle" not in vars(processor)


def test_other_families_get_a_type_error(tmp_path):
    from tests.adapters.families import FAMILIES, load

    onevision = next(f for f in FAMILIES if f.name == "llava_onevision")
    model, processor = load(onevision.build(tmp_path / "ov"))
    with pytest.raises(UnsupportedModelError, match="'prumerge\\+' is not implemented for llava_onevision"):
        apply_method(model, processor, "prumerge+", ratio=0.25)


def test_panel_numbers_count_merged_tokens(tiny):
    model, processor = tiny
    with apply_method(model, processor, "prumerge+", ratio=0.25) as gc:
        _encode(model, processor, (100, 180))
        plan = gc.plans[0]
    nb = panel_numbers(plan)
    text = panel_text(nb)
    rows, cols = plan.grid
    top, bottom, _, _ = plan.valid_box
    pruned_some = [
        len(k) < v
        for k, v in zip(
            _plan_keeps(plan, _g(model)), [_g(model) ** 2, *plan.crop_valid_counts.tolist()], strict=True
        )
    ]
    assert plan.extra_tiles.tolist() == pruned_some and any(pruned_some)
    assert nb.reduction == "merged" and nb.extra_tokens == sum(pruned_some)
    assert nb.newline_tokens == bottom - top  # the remainder tokens are not counted as newlines
    assert nb.thumbnail_tokens + nb.crops_tokens + nb.newline_tokens + nb.extra_tokens == plan.num_tokens
    assert text.thumbnail_header.endswith(
        f"the other {nb.thumbnail_cells - nb.thumbnail_tokens} merged into them"
    )
    assert text.token_line.endswith(f"merged remainders {nb.extra_tokens}")


def test_eval_plans_equal_plans_through_the_model(tiny_clip_dir):
    """`globalcom2 eval`'s shortcut (one tower pass, then plan_prumerge) gives the adapter's plans."""
    from globalcom2.demo.tiny_model import load_tiny

    model, processor = load_tiny(tiny_clip_dir)
    _sharpen(model)
    assert_sweep_plans_match(
        model, processor, "random", random_image(120, 200, seed=5), ("prumerge", "prumerge+")
    )


def test_visualize_methods_cli_takes_the_names(tiny_clip_dir, tmp_path):
    """`globalcom2 visualize --methods prumerge,prumerge+` as a real subprocess: panels, labels and records."""
    from tests.test_cli import run_cli

    img = tmp_path / "photo.png"
    random_image(120, 200, seed=3).save(img)
    out = tmp_path / "grid.png"
    res = run_cli("visualize", "--model", str(tiny_clip_dir), "--image", str(img), "--methods",
                  "globalcom2,prumerge,prumerge+", "--ratio", "0.25", "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    records = {r["method"]: r for r in json.loads(res.stdout)["plans"]}
    for method in ("prumerge", "prumerge+"):
        r = records[method]
        assert r["reduction"] == "merged" and r["mode"] == method and r["extra_tokens"] >= 1
        assert (
            r["num_tokens"]
            == r["thumbnail_tokens"] + r["crops_tokens"] + r["newline_tokens"] + r["extra_tokens"]
        )
    assert records["prumerge+"]["crops_tokens"] >= records["prumerge"]["crops_tokens"]
    assert out.exists()
