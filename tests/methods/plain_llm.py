"""Plain re-implementations for the LLM-side methods' tests: one sample, layer by layer, nothing from ``globalcom2``.

Attention rows are computed head by head from the layer's weights (eager math: q/k projections, rotary embedding,
scaled dot product, causal softmax); selections are Python sorts with the tie rule written out (higher score first,
then the earlier position). The LLM runs one decoder layer at a time on a shrinking list of token indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def head_mean_rows(
    lm, layer, h: torch.Tensor, positions: torch.Tensor, rows: list[int], cos_sin=None
) -> torch.Tensor:
    """Head-mean causal softmax attention of query rows ``rows`` over all keys of ``h`` (1, L, D) in ``layer``.

    ``cos_sin``: the rotary ``(cos, sin)`` of the L entries, when they are not ``rotary_emb`` of 1-D ``positions``
    (M-RoPE: taken from the model's own run). Where ``cos`` is narrower than a head, only the head's first channels
    rotate (partial rotary, Qwen3.5); where ``q_proj`` is twice the heads' width, each head's query is the first half
    of its block (the second is its output gate, Qwen3.5)."""
    attn = layer.self_attn
    cfg = lm.config
    x = layer.input_layernorm(h)[0].float()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = attn.head_dim
    cos, sin = lm.rotary_emb(h, positions[None]) if cos_sin is None else cos_sin
    cos, sin = cos[0].float(), sin[0].float()
    block = dh * (2 if attn.q_proj.weight.shape[0] == 2 * nh * dh else 1)  # a head's rows of q_proj
    rot = cos.shape[-1]
    per_head = []
    for head in range(nh):
        kv = head // (nh // nkv)
        wq = attn.q_proj.weight[head * block : head * block + dh].float()
        wk = attn.k_proj.weight[kv * dh : (kv + 1) * dh].float()
        q, k = x @ wq.T, x @ wk.T
        if attn.q_proj.bias is not None:
            q = q + attn.q_proj.bias[head * block : head * block + dh].float()
            k = k + attn.k_proj.bias[kv * dh : (kv + 1) * dh].float()
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head RMS norms of q and k
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = torch.cat([q[:, :rot] * cos + rotate_half(q[:, :rot]) * sin, q[:, rot:]], dim=-1)
        k = torch.cat([k[:, :rot] * cos + rotate_half(k[:, :rot]) * sin, k[:, rot:]], dim=-1)
        out = []
        for r in rows:
            logits = (q[r] @ k[: r + 1].T) / math.sqrt(dh)
            row = torch.zeros(x.shape[0])
            row[: r + 1] = logits.softmax(-1)
            out.append(row)
        per_head.append(torch.stack(out))
    return torch.stack(per_head).mean(0)


def top_by_score(scores: list[float], candidates: list[int], k: int) -> list[int]:
    """The k candidates with the highest score; ties: the earlier index first."""
    return sorted(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def last_row_select(rows: Callable, counts: list[int], score_offset: int) -> Callable:
    """The ``select`` of :func:`staged_forward` for FastV and PDrop: the last entry's head-mean row
    (``rows(layer, h, positions, [row])``, e.g. :func:`head_mean_rows` bound to the LM) in the stage's scoring layer
    (the layer before it, ``score_offset`` 1, on the entries it saw; or the stage's first layer) ranks the image
    entries, the top ``counts[stage]`` stay, every other entry (text, markers) stays."""

    def select(stage: int, seq: Seq, positions: torch.Tensor) -> tuple[list[int], None, int]:
        h = seq.extra["score_input"] if score_offset else seq.h
        pos = seq.extra["score_positions"] if score_offset else positions
        row = rows(seq.extra["score_layer"], h, pos, [len(seq.origin) - 1])[0]
        images = [i for i, is_image in enumerate(seq.image) if is_image]
        kept = top_by_score(row.tolist(), images, counts[stage])
        return sorted(kept + [i for i, is_image in enumerate(seq.image) if not is_image]), None, -1

    return select


@dataclass
class Seq:
    """The current sequence of the plain run: hidden states and, per entry, its original index (-1 inserted)."""

    h: torch.Tensor
    origin: list[int]
    image: list[bool]
    extra: dict = field(default_factory=dict)


Select = Callable[[int, Seq, torch.Tensor], tuple[list[int], torch.Tensor | None, int]]


def text_model(model):
    """The VLM's decoder stack (``language_model``; Idefics3 / SmolVLM: ``text_model``; Llama 4, whose LLM hangs off
    the model itself: ``language_model.model``)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    lm = lm if lm is not None else inner.text_model
    return lm if hasattr(lm, "layers") else lm.model


def lm_head(model):
    """The VLM's output projection (Llama 4: its causal LM's)."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else model.language_model.lm_head


def causal_inputs(lm, j: int, h: torch.Tensor, positions: torch.Tensor) -> dict:
    """Layer j's ``attention_mask`` (causal, boolean) and rotary ``(cos, sin)`` for a run of the entries ``h``."""
    n = h.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    return {"attention_mask": mask, "position_embeddings": lm.rotary_emb(h, positions[None])}


def embed(model, inputs) -> torch.Tensor:
    """The LLM's input embeddings of the unpatched model (image features scattered into the placeholders), as the
    model itself builds them on any family: taken off the decoder stack's input by a one-off pre-hook."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = kwargs["inputs_embeds"]
        raise _Stop

    hook = text_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen["h"]


class _Stop(Exception):
    pass


@torch.no_grad()
def staged_forward(
    model, inputs, boundaries: list[int], score_offset: int, select: Select, *, compact: bool = True,
    fixed: list[tuple[list[int], torch.Tensor | None, int]] | None = None,
    on_start: Callable[[Seq], None] | None = None,
    layer_inputs: Callable[..., dict] = causal_inputs,
) -> tuple[torch.Tensor, list[list[int]], list]:  # fmt: skip
    """Run the LLM layer by layer, pruning at ``boundaries``; returns (logits, kept origins per stage, decisions).

    ``select(stage, seq, positions)`` returns (kept entry indices of ``seq``, inserted hidden states or None,
    entry index after which they go). It computes the stage's scores itself from ``seq.extra["score_layer"]``,
    ``["score_input"]`` (the hidden states entering that layer) and ``["score_positions"]``.
    ``fixed``: decisions of an earlier (prompt-only) run to replay on a longer sequence (prompt + generated
    tokens, which are text and never pruned). ``layer_inputs(lm, j, h, positions)``: layer j's mask and rotary
    embedding for the current entries (default :func:`causal_inputs`).
    """
    lm = text_model(model)
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    h = embed(model, inputs)
    s = ids.shape[1]
    seq = Seq(h, list(range(s)), [bool(v) for v in (ids[0] == image_id)])
    if on_start is not None:
        on_start(seq)
    full = h.clone()
    kept_sets: list[list[int]] = []
    decisions = []
    positions = torch.arange(s)
    score_layers = [k - score_offset for k in boundaries]

    def prune(stage: int) -> None:
        nonlocal positions
        if fixed is not None:
            keep, extras, after = fixed[stage]
        else:
            keep, extras, after = select(stage, seq, positions)
        decisions.append((keep, extras, after))
        n = len(seq.origin)
        for i in range(n):
            if i not in keep and seq.origin[i] >= 0:
                full[0, seq.origin[i]] = seq.h[0, i]
        order: list[tuple[str, int]] = []
        for i in sorted(keep):
            order.append(("old", i))
            if extras is not None and i == after:
                order += [("new", c) for c in range(extras.shape[0])]
        rows = [seq.h[0, i] if kind == "old" else extras[i] for kind, i in order]
        new_pos = [int(positions[i]) if kind == "old" else -1 for kind, i in order]
        seq.h = torch.stack(rows)[None]
        seq.origin = [seq.origin[i] if kind == "old" else -1 for kind, i in order]
        seq.image = [seq.image[i] if kind == "old" else True for kind, i in order]
        for key, values in list(seq.extra.items()):
            if isinstance(values, list) and len(values) == n:
                seq.extra[key] = [values[i] if kind == "old" else False for kind, i in order]
        positions = torch.arange(len(order)) if compact else torch.tensor(new_pos)
        kept_sets.append([o for o in seq.origin if o >= 0])

    for j, layer in enumerate(lm.layers):
        if score_offset > 0 and j in boundaries:
            prune(boundaries.index(j))
        if j in score_layers:  # the hidden states entering the score layer, for the next prune's scores
            seq.extra["score_layer"] = layer
            seq.extra["score_input"] = seq.h
            seq.extra["score_positions"] = positions
        if score_offset == 0 and j in boundaries:
            prune(boundaries.index(j))
        seq.h = layer(seq.h, **layer_inputs(lm, j, seq.h, positions), position_ids=positions[None])
    for i, o in enumerate(seq.origin):
        if o >= 0:
            full[0, o] = seq.h[0, i]
    return lm_head(model)(lm.norm(full)), kept_sets, decisions
