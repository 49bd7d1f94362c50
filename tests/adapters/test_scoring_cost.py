"""Zero-overhead scoring: the last layer is skipped where its output is unused, its own q/k are used where it runs.

LLaVA-NeXT reads features from layer -2: inside the patched ``get_image_features`` the last layer hands its input on
(never runs) and the scores come from that input; everywhere else (the user's own tower calls, in this or another
thread, and after ``remove()``) the tower returns exactly what it returns unpatched. Where the features come from the
last layer, the scores come from the q/k the layer computes itself and equal the recomputed ones.
"""

from __future__ import annotations

import threading

import pytest
import torch

import globalcom2
from globalcom2.adapters import family
from tests.adapters.plain_families import spy
from tests.conftest import random_image

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
SIZES = [(100, 180), (61, 183), (150, 150)]


def _inputs(processor, sizes=SIZES):
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def _tiles(model, inputs) -> torch.Tensor:
    """The flat batch of tiles HF's get_image_features feeds the tower."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = [
        image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    return torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts, strict=True)])


def _tower_outputs(tower, tiles) -> list[torch.Tensor]:
    with torch.no_grad():
        out = tower(tiles, output_hidden_states=True)
    return [out.last_hidden_state, out.pooler_output, *out.hidden_states]


def _last_layer(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers[-1]


def _count_runs(module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    runs = [0]

    def count(*_):
        runs[0] += 1

    return runs, module.register_forward_hook(count)


def test_last_layer_is_skipped_only_inside_the_patched_encode(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    tiles = _tiles(model, inputs)
    tower, layer = model.model.vision_tower, _last_layer(model)
    before = _tower_outputs(tower, tiles)
    runs, hook = _count_runs(layer.mlp)
    try:
        with globalcom2.apply(model, processor, ratio=0.25) as handle:
            with torch.no_grad():
                feats = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output
            assert runs[0] == 0  # the last layer did not run: its output (layer -1) is not the features (-2)
            assert len(handle.plans) == len(SIZES) and [f.shape[0] for f in feats] == [
                p.num_tokens for p in handle.plans
            ]
            during = _tower_outputs(tower, tiles)  # the user's own tower call while patched: the full tower
            assert runs[0] == 1
            # a call with features from the last layer runs it (the scores then come from its own q/k)
            with torch.no_grad():
                model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-1
                )
            assert runs[0] == 2
        assert "forward" not in vars(layer)  # remove() took the instance-level wrapper off again
        after = _tower_outputs(tower, tiles)
    finally:
        hook.remove()
    for a, b, c in zip(before, during, after, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_skipped_layer_gives_the_same_features_and_plans(tiny, mode):
    """Features from layer -2 and the plans equal those of the full tower with the scores recomputed from
    ``hidden_states[-2]``: skipping changes nothing but the work."""
    model, processor = tiny
    inputs = _inputs(processor)
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as handle:
        with torch.no_grad():
            skipped = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        plans = [(p.thumbnail_mask, p.crops_mask, p.thumbnail_order) for p in handle.plans]
        handle.adapter._skips_last_layer = False  # the pre-change behaviour: the whole tower runs
        with torch.no_grad():
            full = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        for a, b in zip(skipped, full, strict=True):
            assert torch.equal(a, b)
        for (tm, cm, order), p in zip(plans, handle.plans, strict=True):
            assert torch.equal(tm, p.thumbnail_mask) and torch.equal(cm, p.crops_mask)
            assert torch.equal(order, p.thumbnail_order)


def test_tapped_scores_equal_recomputed_scores(tiny, monkeypatch):
    """The same model scored both ways: features from layer -1 (the last layer runs, q/k are tapped from its own
    projections) and from -2 (skipped, q/k recomputed from its input) give the same scores."""
    model, processor = tiny
    inputs = _inputs(processor)
    tapped = spy(monkeypatch, family, "cls_scores_from_qk")
    recomputed = spy(monkeypatch, family, "cls_attention_scores")
    for score in ("logits", "softmax"):
        tapped.clear()
        recomputed.clear()
        with globalcom2.apply(model, processor, ratio=0.25, mode="reference", score=score):
            with torch.no_grad():
                model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-1
                )
                model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-2
                )
        assert (
            len(tapped) == 1 and len(recomputed) == 1
        )  # one path per call (the recomputed path calls no tap)
        torch.testing.assert_close(tapped[0], recomputed[0], rtol=1e-5, atol=1e-6)


def test_direct_tower_call_from_another_thread_during_a_patched_encode(tiny):
    """Thread A's patched encode is held at the last layer (skipped there) while thread B calls the tower directly:
    B gets the unpatched output bit for bit and A the features it gets alone."""
    model, processor = tiny
    inputs = _inputs(processor)
    tiles = _tiles(model, inputs)
    tower, layer = model.model.vision_tower, _last_layer(model)
    expected_b = _tower_outputs(tower, tiles)
    with globalcom2.apply(model, processor, ratio=0.25):
        with torch.no_grad():
            alone = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]
            ).pooler_output
        a_at_layer, b_done = threading.Event(), threading.Event()
        a_ident: list[int] = []

        def hold(*_):  # runs before GlobalCom²'s own pre-hook; only thread A waits here
            if threading.get_ident() in a_ident:
                a_at_layer.set()
                assert b_done.wait(timeout=120)

        hook = layer.register_forward_pre_hook(hold, prepend=True)
        got: dict = {}

        def thread_a():
            a_ident.append(threading.get_ident())
            with torch.no_grad():
                got["a"] = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"]
                ).pooler_output

        def thread_b():
            assert a_at_layer.wait(timeout=120)
            got["b"] = _tower_outputs(tower, tiles)
            b_done.set()

        try:
            threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        finally:
            hook.remove()
    assert set(got) == {"a", "b"}
    for x, y in zip(got["b"], expected_b, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(got["a"], alone, strict=True):
        assert torch.equal(x, y)
