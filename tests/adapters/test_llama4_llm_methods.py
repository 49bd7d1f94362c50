"""FastV and PDrop on Llama 4's LLM against a plain layer-by-layer run (nothing from ``globalcom2``'s pruner).

Llama 4's text model differs from a Llama one where the pruner touches it: chunked-attention layers (a token sees
only the earlier tokens of its chunk of ``attention_chunk_size``), every fourth layer a NoPE layer (full attention, q
and k not rotated, each query row scaled by a temperature of its sequence index), an L2 norm of the rotated q and k,
its rotary embedding one complex tensor, and MoE feed-forward layers. The checkpoint here is the family table's tiny
Llama 4 with 4 text layers (layers 0-2 chunked, layer 3 NoPE), chunks of 50 tokens and a strong temperature
(``floor_scale`` 16, ``attn_scale`` 2), so one prompt spans three chunks and every piece is exercised: FastV scores inside the last token's chunk (layer
0) and the layers after its drop rebuild the chunked masks and the temperatures of the shorter sequence (the pruned
sequence is the LLM's input: chunks and temperatures count its entries, rotary positions stay the original ones);
PDrop scores in the NoPE layer. Only image tokens are ranked and dropped; the tile separators stay.

The plain run computes every attention row head by head from the layer's weights, written from Llama 4's modelling
code (pairs of q/k channels rotated as complex numbers by the model's own rotary frequencies, L2 norm, temperature
log1p(floor((i + 1) / floor_scale)) * attn_scale + 1, causal and chunk visibility), and runs each decoder layer on
the shrinking sequence with a boolean mask built the same way.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from globalcom2.methods import apply_method
from globalcom2.methods.schedule import pdrop_schedule
from tests.adapters.families import load
from tests.methods.plain_llm import last_row_select, staged_forward, text_model

CHUNK = 50
TEXT = {"text_layers": 4, "attention_chunk_size": CHUNK, "floor_scale": 16, "attn_scale": 2.0}
PROMPT = "USER: <|image|>\nWhat is shown in this image? ASSISTANT:"


@pytest.fixture(scope="module")
def llama4_dir(checkpoint):
    from globalcom2.demo.tiny_tiling import build_tiny_llama4

    return checkpoint(build_tiny_llama4, **TEXT)


def _kinds(lm) -> list[str]:
    return list(lm.config.layer_types)


def _visible(kind: str, n: int) -> torch.Tensor:
    """``(n, n)`` who sees whom: causal, and within the same chunk of ``CHUNK`` entries in a chunked layer."""
    i = torch.arange(n)
    mask = i[None, :] <= i[:, None]
    if kind == "chunked_attention":
        mask &= i[None, :] // CHUNK == i[:, None] // CHUNK
    return mask


def _layer_inputs(lm, j: int, h: torch.Tensor, positions: torch.Tensor) -> dict:
    return {"attention_mask": _visible(_kinds(lm)[j], h.shape[1])[None, None],
            "position_embeddings": lm.rotary_emb(h, positions[None])}  # fmt: skip


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (L, dh): channels (2m, 2m + 1) as one complex number times ``freqs[:, m]``."""
    pairs = torch.complex(x[:, 0::2], x[:, 1::2]) * freqs
    return torch.stack([pairs.real, pairs.imag], dim=-1).reshape(x.shape)


def _rows(lm, layer, h: torch.Tensor, positions: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Head-mean softmax attention of query rows ``rows`` over the entries of ``h`` (1, L, D) in ``layer``."""
    attn = layer.self_attn
    cfg = lm.config
    kind = _kinds(lm)[attn.layer_idx]
    rope = bool(cfg.no_rope_layers[attn.layer_idx])
    x = layer.input_layernorm(h)[0].float()
    n = x.shape[0]
    nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    freqs = lm.rotary_emb(h, positions[None])[0]  # (L, dh / 2) complex: the model's own frequencies
    visible = _visible(kind, n)
    per_head = []
    for head in range(nh):
        kv = head // (nh // nkv)
        q = x @ attn.q_proj.weight[head * dh : (head + 1) * dh].float().T
        k = x @ attn.k_proj.weight[kv * dh : (kv + 1) * dh].float().T
        if rope:
            q, k = _rotate(q, freqs), _rotate(k, freqs)
            if cfg.use_qk_norm:
                q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
                k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            scale = [math.log1p(math.floor((i + 1) / cfg.floor_scale)) * cfg.attn_scale + 1 for i in range(n)]
            q = q * torch.tensor(scale)[:, None]
        out = []
        for r in rows:
            logits = (q[r] @ k.T) / math.sqrt(dh)
            out.append(torch.where(visible[r], logits, -math.inf).softmax(-1))
        per_head.append(torch.stack(out))
    return torch.stack(per_head).mean(0)


@pytest.mark.parametrize(
    ("method", "ratio", "options"),
    [("fastv", 0.17, {"layer": 1}), ("pdrop", 0.875, {"stages": 2, "layers": (3,)})],
    ids=["fastv-chunked", "pdrop-nope"],
)
def test_llm_methods_on_llama4_equal_a_plain_run(llama4_dir, method, ratio, options):
    from tests.conftest import random_image

    model, processor = load(llama4_dir)
    lm = text_model(model)
    assert _kinds(lm) == ["chunked_attention"] * 3 + ["full_attention"]
    image = random_image(100, 190, seed=0)
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    ids = inputs["input_ids"]
    image_id = int(model.config.image_token_id)
    run = (ids[0] == image_id).nonzero().reshape(-1).tolist()
    n = len(run)
    last = ids.shape[1] - 1
    separators = [i for i in range(run[0], run[-1]) if i not in set(run)]
    # several chunks, image tokens in the last token's chunk
    assert separators and last // CHUNK > 0 and run[-1] // CHUNK == last // CHUNK
    if method == "fastv":
        boundaries, offset, compact, counts = [1], 1, False, [int(n * ratio)]
    else:
        sched = pdrop_schedule(len(lm.layers), ratio, stages=2, layers=options["layers"])
        boundaries, offset, compact = list(sched.boundaries), 0, True
        counts = [int(n * s) for s in sched.shares]

    select = last_row_select(functools.partial(_rows, lm), counts, offset)
    logits, kept_sets, _ = staged_forward(model, inputs, boundaries, offset, select, compact=compact,
                                          layer_inputs=_layer_inputs)  # fmt: skip
    survivors = set(kept_sets[-1])
    assert all(s in survivors for s in separators)
    # FastV: the layers after its drop run a pruned sequence of two chunks, with temperatures in layer 3
    if method == "fastv":
        assert len(kept_sets[-1]) > CHUNK
    with apply_method(model, processor, method, ratio=ratio, **options) as handle:
        with torch.no_grad():
            ours = model(**processor(images=[image], text=[PROMPT], return_tensors="pt")).logits
        plan = handle.plans[0]
    assert plan.num_tokens_full == n and plan.num_tokens == counts[-1]
    kept = [p for p in run if p in survivors]
    assert int(plan.thumbnail_mask.sum() + plan.crops_mask.sum()) == len(kept)
    torch.testing.assert_close(ours, logits, atol=2e-4, rtol=2e-4)
