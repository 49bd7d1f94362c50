"""Pre-LLM baselines (FasterVLM-style, random, pooling) on a real tiny LLaVA-NeXT: counts, selection, features."""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import globalcom2
from globalcom2.adapters.anyres import AnyresGeometry, valid_box
from globalcom2.adapters.errors import AlreadyAppliedError, UnsupportedModelError
from globalcom2.adapters.llava_next import LlavaNextAdapter, image_grid
from globalcom2.methods import METHODS, apply_method
from globalcom2.methods.vision import PoolingAdapter, PoolingPlan, RandomAdapter, plan_pooling, pooled_side
from tests.conftest import PROMPT, random_image

SIZES = [(64, 64), (100, 180), (180, 100), (40, 200), (200, 40), (33, 77), (300, 310), (61, 183)]
RATIOS = (0.5, 0.25, 0.1)


def _g(model):
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def _grid(model, size):
    return image_grid(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)


def _run(model, processor, size, seed=0):
    inputs = processor(images=[random_image(*size, seed=seed)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return inputs, feats[0], n_placeholders


@pytest.mark.parametrize("method", ["fastervlm", "random", "pooling"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_documented_token_count(tiny, method, ratio):
    """processor placeholders == features == plan.num_tokens == the documented formula, for many sizes."""
    model, processor = tiny
    g = _g(model)
    with apply_method(model, processor, method, ratio=ratio) as gc:
        for i, size in enumerate(SIZES):
            _, feats, n = _run(model, processor, size, seed=i)
            rows, cols = _grid(model, size)
            top, bottom, left, right = valid_box(size[0], size[1], rows * g, cols * g)
            h, w = bottom - top, right - left
            if method == "pooling":  # a0*a0 + (sum_r a_r) * (sum_c b_c) + sum_r a_r
                a = sum(pooled_side(min((r + 1) * g, bottom) - max(r * g, top), ratio) for r in range(rows))
                b = sum(pooled_side(min((c + 1) * g, right) - max(c * g, left), ratio) for c in range(cols))
                expected = pooled_side(g, ratio) ** 2 + a * b + a
            else:  # int(g*g*R) + int(R*h*w) + one newline per row
                expected = int(g * g * ratio) + int(ratio * (h * w)) + h
                plan = gc.plans[0]
                assert int(plan.thumbnail_mask.sum()) == int(g * g * ratio)
                assert int(plan.crops_mask.sum()) == int(ratio * int(plan.crop_valid_counts.sum()))
            assert n == feats.shape[0] == gc.plans[0].num_tokens == expected, (method, size)


def _own_softmax_cls(model, inputs):
    """Independent [CLS] attention probabilities (eager path of the tower, head mean) per tile."""
    tower = model.model.vision_tower
    n = 1 + math.prod(_grid(model, tuple(inputs["image_sizes"][0].tolist())))
    with torch.no_grad():
        out = tower(inputs["pixel_values"][0, :n], output_attentions=True)
    return out.attentions[-1][:, :, 0, 1:].mean(1)  # (tiles, g*g)


def test_fastervlm_is_per_tile_topk_of_own_attention_at_uniform_ratio(tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    model, processor = load_tiny(tiny_clip_dir, attn_implementation="eager")
    g = _g(model)
    ratio = 0.25
    with apply_method(model, processor, "fastervlm", ratio=ratio) as gc:
        for i, size in enumerate([(100, 180), (120, 130), (300, 310)]):
            inputs, _, _ = _run(model, processor, size, seed=i)
            plan = gc.plans[0]
            att = _own_softmax_cls(model, inputs)
            thumb_top = att[0].argsort(descending=True)[: int(g * g * ratio)]
            assert set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()) == set(
                thumb_top.tolist()
            )
            rows, cols = plan.grid
            tiles = plan.crops_mask.reshape(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g)
            top, bottom, left, right = plan.valid_box
            valid = torch.zeros(rows * g, cols * g, dtype=torch.bool)
            valid[top:bottom, left:right] = True
            valid = valid.reshape(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g)
            for j in range(rows * cols):  # per crop: its own top-k_j, k_j ~ R * N_j (uniform, no allocation)
                k = int(plan.crop_keep_counts[j])
                n_j = int(valid[j].sum())
                assert abs(k - ratio * n_j) < 1.0
                s = att[1 + j].masked_fill(~valid[j], -1.0)
                assert set(tiles[j].nonzero().reshape(-1).tolist()) == set(
                    s.argsort(descending=True)[:k].tolist()
                )
            assert torch.allclose(plan.crop_ratios, torch.full_like(plan.crop_ratios, ratio))


def test_random_is_seeded_and_spread(tiny):
    model, processor = tiny
    masks = {}
    for seed in (0, 0, 1):
        with apply_method(model, processor, "random", ratio=0.25, seed=seed) as gc:
            _run(model, processor, (100, 180))
            masks.setdefault(seed, []).append(gc.plans[0].crops_mask.clone())
    assert torch.equal(masks[0][0], masks[0][1])
    assert not torch.equal(masks[0][0], masks[1][0])


def test_pooling_features_are_cell_means(tiny):
    """Each pooled token is the plain mean of the projected features of the cells it covers."""
    model, processor = tiny
    g = _g(model)
    size, ratio = (100, 180), 0.25
    with apply_method(model, processor, "pooling", ratio=ratio) as gc:
        inputs, pooled, _ = _run(model, processor, size)
        plan = gc.plans[0]
    assert isinstance(plan, PoolingPlan)
    with torch.no_grad():  # unpatched: per-tile projected features
        hs = model.model.vision_tower(
            inputs["pixel_values"][0, : 1 + plan.num_crops], output_hidden_states=True
        )
        feats = model.model.multi_modal_projector(hs.hidden_states[-2][:, 1:])
    a0 = pooled_side(g, ratio)
    assert int(plan.thumbnail_cover.max()) + 1 == a0 * a0
    for p in range(a0 * a0):
        cells = (plan.thumbnail_cover.reshape(-1) == p).nonzero().reshape(-1)
        torch.testing.assert_close(pooled[p], feats[0, cells].mean(0))
    rows, cols = plan.grid
    canvas = feats[1:].reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g * cols * g, -1)
    h, w = plan.pooled_shape
    start = a0 * a0
    for y in range(h):
        for x in range(w):
            cells = (plan.crops_cover.reshape(-1) == y * w + x).nonzero().reshape(-1)
            torch.testing.assert_close(pooled[start + y * (w + 1) + x], canvas[cells].mean(0))
        torch.testing.assert_close(pooled[start + y * (w + 1) + w], model.model.image_newline)
    # the cover is a partition of the valid area; masks mark every valid cell (nothing is discarded)
    assert (
        int(plan.crops_mask.sum()) == int((plan.crops_cover >= 0).sum()) == int(plan.crop_valid_counts.sum())
    )


def test_pooling_geometry():
    box = valid_box(336, 672, 48, 48)
    plan = plan_pooling(AnyresGeometry((2, 2), 24, box, (box[1] - box[0], box[3] - box[2])), ratio=0.25)
    assert plan.pooled_shape == (2 * 6, 24)  # valid rows 12 per crop row -> 6; 24 columns -> 12 each
    assert plan.num_tokens == 144 + 12 * 24 + 12
    assert plan.crop_keep_counts.tolist() == [72, 72, 72, 72]
    assert pooled_side(24, 0.1) == 8 and pooled_side(24, 0.5) == 17 and pooled_side(0, 0.5) == 0


@pytest.mark.parametrize("method", ["fastervlm", "random", "pooling"])
def test_remove_restores_model_and_processor(tiny, method):
    model, processor = tiny
    inputs = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    with apply_method(model, processor, method, ratio=0.1) as gc:
        assert gc.method == method
        small = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
        assert small["input_ids"].shape[1] < inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**small, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == small["input_ids"].shape[1] + 2
    again = processor(images=[random_image(100, 180)], text=[PROMPT], return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_methods_share_the_install_path(tiny):
    """Every baseline is an adapter installed by the one install path, with its name and options on the handle."""
    model, processor = tiny
    expected = {"fastervlm": LlavaNextAdapter, "random": RandomAdapter, "pooling": PoolingAdapter}
    for method, cls in expected.items():
        with apply_method(model, processor, method, ratio=0.25) as gc:
            assert type(gc.adapter) is cls and gc.method == method
            assert gc.method_options == {"ratio": 0.25, **METHODS[method].options}
            assert model._globalcom2_handle is gc and processor._globalcom2_handle is gc
            with pytest.raises(AlreadyAppliedError):
                apply_method(model, processor, "random", ratio=0.5)
        assert "_globalcom2_handle" not in model.__dict__ and "_globalcom2_handle" not in processor.__dict__
    with apply_method(model, processor, "random", ratio=0.1, seed=3) as gc:
        assert gc.method_options == {"ratio": 0.1, "seed": 3} and gc.adapter.seed == 3
    with pytest.raises(TypeError, match="`seed` must be an int"):
        apply_method(model, processor, "random", ratio=0.1, seed=1.5)


def test_fastervlm_is_globalcom2_with_uniform_local_softmax(tiny):
    """FasterVLM = the GlobalCom² pipeline with allocation, scoring and score swapped; nothing else differs."""
    model, processor = tiny
    with apply_method(model, processor, "fastervlm", ratio=0.25) as gc:
        cfg = gc.config
        assert (cfg.allocation, cfg.scoring, cfg.score) == ("uniform", "local", "softmax")
        _run(model, processor, (100, 180))
        a = gc.plans[0]
    with globalcom2.apply(
        model, processor, ratio=0.25, allocation="uniform", scoring="local", score="softmax"
    ) as gc:
        _run(model, processor, (100, 180))
        b = gc.plans[0]
    assert torch.equal(a.crops_mask, b.crops_mask) and torch.equal(a.thumbnail_mask, b.thumbnail_mask)
    assert torch.equal(a.thumbnail_order, b.thumbnail_order)


def test_random_draw_depends_on_seed_and_geometry_only(tiny):
    """Each image's draw comes from its own generator: batch position, threads and call order do not matter."""
    model, processor = tiny
    sizes = [(100, 180), (100, 180), (150, 150)]
    images = [random_image(*s, seed=i) for i, s in enumerate(sizes)]
    with apply_method(model, processor, "random", ratio=0.25, seed=5) as gc:
        inputs = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        batch = [p.crops_mask.clone() for p in gc.plans]
        assert torch.equal(batch[0], batch[1])  # same seed, same geometry -> same draw

        def alone(i: int) -> torch.Tensor:
            _run(model, processor, sizes[i], seed=i)
            return gc.plans[0].crops_mask.clone()

        with ThreadPoolExecutor(3) as pool:
            threaded = list(pool.map(alone, [2, 1, 0, 2]))
    assert [m.tolist() for m in threaded] == [batch[2].tolist(), batch[1].tolist(), batch[0].tolist(),
                                              batch[2].tolist()]  # fmt: skip


def test_methods_a_family_does_not_run_are_refused_before_patching(tmp_path):
    """A (method, family) pair the registry does not list gets a TypeError naming why, before anything is patched;
    the pairs it lists are exactly the ones apply_method accepts (here: OneVision, no processor needed to refuse)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from globalcom2.demo.tiny_families import build_tiny_llava_onevision
    from globalcom2.methods import method_support

    path = build_tiny_llava_onevision(tmp_path / "ov")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    refused = [m for m in METHODS if method_support(m, "llava_onevision") is not None]
    # PruMerge(+): SigLIP has no [CLS] token (the LLM-side refusals are tested with those methods)
    assert {"prumerge", "prumerge+"} <= set(refused) and "pooling" not in refused
    assert "SigLIP vision tower has no [CLS] token" in method_support("prumerge", "llava_onevision")
    for method in refused:
        with pytest.raises(
            UnsupportedModelError, match=re.escape(f"'{method}' is not implemented for llava_onevision")
        ):
            apply_method(model, None, method, ratio=0.25)
        assert "_globalcom2_handle" not in model.__dict__
    with pytest.raises(TypeError, match="unsupported model class"):
        apply_method(torch.nn.Linear(2, 2), None, "fastervlm", ratio=0.25)


def test_readme_support_matrix_is_the_registry():
    """The README's method x family table is generated from the registry (regenerate it with
    ``globalcom2.methods.support_matrix_markdown()``), so it cannot go stale."""
    from pathlib import Path

    from globalcom2.methods import support_matrix_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("<!-- methods-matrix:start -->\n")[1].split("\n<!-- methods-matrix:end -->")[0]
    assert table == support_matrix_markdown(), "stale: run `python scripts/methods_matrix.py`"
