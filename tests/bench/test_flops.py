"""The analytic cost model: the paper's numbers, the config-derived count (checked against torch's FLOP counter
on a real forward) and the KV-cache size (checked against a real cache)."""

from __future__ import annotations

import pytest
import torch

from globalcom2.bench.flops import (
    ModelDims,
    config_table,
    dims_from_config,
    kv_cache_bytes,
    llava_next_7b_config,
    paper_prefill_flops,
    paper_table,
    prefill_flops,
)


@pytest.mark.parametrize("tokens, tflops", [(2880, 41.65), (720, 9.60), (288, 3.77)])
def test_paper_formula_reproduces_the_papers_numbers(tokens, tflops):
    assert round(paper_prefill_flops(tokens) / 1e12, 2) == tflops


def test_paper_table_ratios_and_kv_cache():
    rows = paper_table((1.0, 0.5, 0.25, 0.1))
    assert [r["visual_tokens"] for r in rows] == [2880, 1440, 720, 288]
    assert [round(r["tflops"], 2) for r in rows] == [41.65, 19.74, 9.60, 3.77]
    # 2 (K and V) * 32 layers * 4096 * 2 bytes = 0.5 MiB per token in fp16.
    assert kv_cache_bytes(1, 32, 4096, 2) == 2**19
    assert rows[0]["kv_cache_mb"] == 1440.0


def test_7b_config_dims():
    dims = dims_from_config(llava_next_7b_config())
    assert (dims.text.hidden, dims.text.intermediate, dims.text.num_layers) == (4096, 11008, 32)
    assert dims.text.q_dim == dims.text.kv_dim == 4096 and dims.text.gated_mlp
    assert dims.vision is not None
    assert (dims.vision.tokens_per_tile, dims.vision.num_layers, dims.projector_in) == (577, 24, 1024)


@pytest.mark.parametrize("tokens", [1, 288, 720, 2880, 5000])
def test_config_formula_restricted_equals_paper_formula(tokens):
    dims = dims_from_config(llava_next_7b_config())
    restricted = prefill_flops(ModelDims(text=dims.text), num_visual_tokens=tokens, logits_tokens=0)
    assert restricted.vision == restricted.projector == restricted.lm_head == 0
    assert restricted.total == pytest.approx(paper_prefill_flops(tokens), rel=1e-12)


def test_config_formula_full_adds_vision_text_and_head():
    cfg = llava_next_7b_config()
    full = prefill_flops(cfg, num_visual_tokens=2880, num_text_tokens=64, num_tiles=5)
    assert full.llm > paper_prefill_flops(2880)  # text tokens included
    assert full.vision / 1e12 == pytest.approx(1.91, abs=0.01)  # 5 tiles through CLIP-L/336
    assert full.lm_head == 2 * 4096 * 32064
    causal = prefill_flops(cfg, num_visual_tokens=2880, num_text_tokens=64, num_tiles=5, causal=True)
    n = 2880 + 64
    assert full.llm - causal.llm == pytest.approx(32 * 2 * n * n * 4096)


def test_grouped_query_attention_shrinks_kv_projections():
    from transformers import LlamaConfig

    mha = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=100)  # fmt: skip
    gqa = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=100)  # fmt: skip
    a, b = (prefill_flops(c, num_visual_tokens=0, num_text_tokens=100).llm for c in (mha, gqa))
    # k and v projections shrink from 256 to 64 outputs: 2 layers * 2 matrices * 2 * n * d * (256 - 64)
    assert a - b == 2 * 2 * 2 * 100 * 256 * (256 - 64)
    assert kv_cache_bytes(10, 2, dims_from_config(gqa).text.kv_dim, 4) == 2 * 2 * 10 * 64 * 4


def _tiny_llava(kv_heads: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4)  # fmt: skip
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024)  # fmt: skip
    pins = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins, image_token_id=4,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")  # matmul attention, which the FLOP counter sees
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_config_formula_matches_torch_flop_counter(kv_heads):
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny_llava(kv_heads)
    tiles, sizes = torch.randn(5, 3, 64, 64), torch.tensor([[128, 128]])
    n_visual, n_text = 100, 23
    expected = prefill_flops(model.config, num_visual_tokens=n_visual, num_text_tokens=n_text, num_tiles=5)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as vision_counter:
            model.model.get_image_features(tiles, sizes)
        with FlopCounterMode(display=False) as llm_counter:
            out = model(inputs_embeds=torch.randn(1, n_visual + n_text, 64), logits_to_keep=1, use_cache=True)
    assert vision_counter.get_total_flops() == expected.vision + expected.projector
    assert llm_counter.get_total_flops() == expected.llm + expected.lm_head
    # ... and the KV-cache formula matches the cache the forward built.
    from globalcom2.bench.measure import _cache_bytes

    dims = dims_from_config(model.config)
    assert _cache_bytes(out) == kv_cache_bytes(n_visual + n_text, 2, dims.text.kv_dim, 4) > 0


@pytest.mark.parametrize(
    "image_size, tokens",
    [
        # 2x2 grid, nothing padded (48 x 48 crop tokens): 576 + 2304 + 48 newlines; R = 0.1: 57 + 230 + 48
        ((672, 672), [2928, 335]),
        # 2x2 grid, rows 6..42 of 48 valid (36 x 48): 576 + 1728 + 36; R = 0.1: 57 + int(172.8) + 36
        ((480, 640), [2340, 265]),
    ],
)
def test_config_table_counts_the_llava_next_budget_tokens(image_size, tokens):
    rows = config_table(llava_next_7b_config(), image_size=image_size, num_text_tokens=0, ratios=(1.0, 0.1))
    assert [r["visual_tokens"] for r in rows] == tokens
    assert [r["num_tiles"] for r in rows] == [5, 5]
    for r in rows:
        assert r["tflops_paper_terms"] == pytest.approx(paper_prefill_flops(r["visual_tokens"]) / 1e12)


def test_analytic_cli_prints_paper_numbers(capsys):
    from globalcom2.cli import main

    assert main(["bench", "--analytic-only"]) == 0
    out = capsys.readouterr().out
    for row in (("2880", "41.65"), ("720", "9.60"), ("288", "3.77")):
        assert any(line.split()[1:3] == list(row) for line in out.splitlines() if len(line.split()) >= 3), row
