"""The LLM-side methods on Qwen3.5's hybrid LLM (Gated DeltaNet linear-attention layers between gated attention
layers), beyond the family table (3 layers: full, linear, full; FastV, PDrop and SparseVLM there score in the full
layers, and test_family_methods_plain.py holds FastV to a plain run across the linear layer).

Here, on a 4-layer variant (full, linear, full, linear): a method whose scoring layer is a linear-attention layer is
refused before anything is patched (such a layer has no attention row), and a stage made only of linear layers
(SparseVLM's second stage, layer 3) decodes from its recurrent state: its KV-free layers take the pruned prompt's
length from another layer, and a left-padded batch generates what each sample generates alone.
"""

from __future__ import annotations

import pytest
import torch

from globalcom2.methods import apply_method
from tests.adapters.families import FAMILIES, greedy, inputs_for, load
from tests.conftest import module_state

FAMILY = next(f for f in FAMILIES if f.name == "qwen3_5")


@pytest.fixture(scope="module")
def qwen3_5_dir(checkpoint):
    from globalcom2.demo.tiny_qwen import build_tiny_qwen3_5

    return checkpoint(build_tiny_qwen3_5, text_layers=4)


def test_a_linear_scoring_layer_is_refused_before_patching(qwen3_5_dir):
    model, processor = load(qwen3_5_dir)
    kinds = list(model.config.text_config.layer_types)
    assert kinds == ["full_attention", "linear_attention"] * 2
    state = module_state(model)
    with pytest.raises(
        TypeError, match=r"layer 1, a linear-attention layer .*full-attention layers \(0, 2\)"
    ):
        apply_method(model, processor, "fastv", ratio=0.5, layer=2)  # FastV scores in layer K - 1 = 1
    assert module_state(model) == state
    apply_method(model, processor, "fastv", ratio=0.5, layer=3).remove()  # layer 2 scores: accepted


@pytest.mark.full
def test_a_stage_of_linear_layers_decodes_and_a_batch_equals_each_alone(qwen3_5_dir):
    model, processor = load(qwen3_5_dir)
    images = FAMILY.images(seed=5)[:3]
    with apply_method(model, processor, "sparsevlm", ratio=0.6, layers=(0, 2)) as handle:
        assert handle.adapter.pruner.stage_layers(1) == range(3, 4)  # layer 3 alone: linear attention
        batch = greedy(model, inputs_for(FAMILY, processor, images), new_tokens=4)
        for i, image in enumerate(images):
            alone = greedy(model, inputs_for(FAMILY, processor, [image]), new_tokens=4)
            assert torch.equal(batch[i], alone[0]), i
        plan = handle.plans[0]
    assert plan.layer_tokens[3] < plan.layer_tokens[1] < plan.layer_tokens[0]  # two drops
