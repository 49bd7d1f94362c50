"""Multi-stage pruning of image tokens inside a Hugging Face LLM, on forward pre-hooks (FastV, PDrop, SparseVLM).

A method prunes in stages (:class:`~globalcom2.methods.schedule.Schedule`): layer K_s is the first layer of stage s
and sees a smaller set of image tokens than layer K_s - 1. A stage's tokens are ranked by the attention of a few
query rows (FastV and PDrop: the last prompt token; SparseVLM: its text raters) in one layer: K_s - 1 (FastV,
SparseVLM) or K_s (PDrop). Only those rows are computed (:func:`query_attention`: the layer's own norm,
projections and rotary embedding on the layer's input, the [CLS]-row trick of :mod:`globalcom2.core.scores`
applied to the LLM), so every layer keeps SDPA / Flash attention and nothing asks for ``output_attentions``.

Everything runs on forward pre-hooks of the decoder layers (no copy of ``LlamaModel.forward``):

- **prefill** (the call whose ``input_ids`` hold image placeholders): at K_s the hook gathers the surviving entries
  of the current sequence (hidden states, rotary ``(cos, sin)``, ``position_ids``) and builds the causal mask of
  the shorter sequence against layer K_s's cache; later layers reuse them until the next boundary. Layers of stage
  s store only stage s's tokens in the KV cache. A method may also *insert* tokens at a boundary (SparseVLM's
  recycled tokens). A forward hook on the last layer scatters the outputs back to the full length, each dropped
  token carrying its hidden state from the layer where it was dropped ("early exit"), so ``forward`` returns
  logits for every input position and ``generate`` sees the last token as usual.
- **decode** (later calls on the same cache object): each boundary rebuilds the mask from its stage's pruned
  prompt plus the new tokens, sized against its own cache.

Positions: ``"keep"`` (FastV's code) leaves every surviving token its original position; ``"compact"`` (PDrop's
and SparseVLM's code) renumbers each stage's sequence without gaps, so a token's position drops by the number of
tokens removed before it (and grows by the tokens inserted before it); decode tokens are shifted by the stage's
total, as PDrop's code does.

Layer kinds: each kind's mask is rebuilt for the pruned sequence (causal, sliding window, chunked attention,
linear attention; windows and chunks count entries of the pruned sequence), and the score rows attend as their layer
does (a sliding window or a chunk; Llama 4's complex rotary embedding, qk norm and NoPE temperature; Qwen3.5's gated
``q_proj``). A linear-attention (Gated DeltaNet) layer has no attention row: it cannot be a scoring layer.

Samples of a batch keep different numbers of tokens; the pruned batch is padded with masked filler entries that
are restored afterwards, so every sample's result equals its result alone. Per-forward values live in a per-thread
state, so several threads can run ``generate`` on one patched model. Beam search (cache reordering) is not
supported.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..adapters.anyres import AnyresAdapter
from ..adapters.base import GlobalComHandle
from ..adapters.errors import UnsupportedModelError
from ..core.plan import Plan
from ..core.ranking import topk_mask
from .layout import (
    ImageTokenLayout,
    image_token_layout,
    native_token_layout,
    plan_from_keep,
    single_tile_layout,
    tile_token_layout,
)
from .schedule import Schedule
from .vision import image_sizes_list

# -------------------------------------------------------------------------------------------- pure pieces


def outer_model(model: Any) -> Any:
    """The module that merges the image features into the LLM's input: ``model.model`` (LLaVA, InternVL, ...), or
    the model itself where the tower and the LLM hang off it (Llama 4)."""
    return getattr(model, "model", model)


def language_model(model: Any) -> Any:
    """The decoder stack of a VLM: ``model.model.language_model`` (LLaVA, InternVL, ...), ``.text_model``
    (Idefics3, SmolVLM) or ``model.language_model.model`` (Llama 4: a causal LM whose ``model`` holds the layers)."""
    inner = outer_model(model)
    lm = getattr(inner, "language_model", None)
    lm = lm if lm is not None else inner.text_model
    return lm if hasattr(lm, "layers") else lm.model


def num_llm_layers(model: Any) -> int:
    """L, the number of decoder layers of the VLM's language model."""
    return len(language_model(model).layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


#: attention classes whose layers rotate q and k only where they attend within a sliding window; their
#: full-attention layers use no positional embedding (Cohere2, the LLM of Aya Vision)
_ROPE_ON_SLIDING_ONLY = ("Cohere2Attention",)


def _rope(attn: Any):
    """The rotary function of the attention module's own modelling file (Llama-style fallback); the identity where
    the layer uses no positions (:data:`_ROPE_ON_SLIDING_ONLY` outside a sliding window)."""
    if type(attn).__name__ in _ROPE_ON_SLIDING_ONLY and getattr(attn, "sliding_window", None) is None:
        return lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn

    def apply(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    return apply


def _gather_rows(pe: Any, index: torch.Tensor) -> Any:
    """A layer's rotary embedding at the sequence entries ``index`` ``(B, L)``: ``(cos, sin)``, each
    ``(B or 1, S, d)`` -> ``(B, L, d)``, or Llama 4's one complex ``(B or 1, S, d)`` tensor -> ``(B, L, d)``."""
    b = index.shape[0]
    if isinstance(pe, torch.Tensor):
        return pe.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, pe.shape[-1]))
    g = index[..., None].expand(-1, -1, pe[0].shape[-1])
    return pe[0].expand(b, -1, -1).gather(1, g), pe[1].expand(b, -1, -1).gather(1, g)


def _rotate(
    attn: Any, q: torch.Tensor, k: torch.Tensor, q_pe: Any, k_pe: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(B, H, Q, dh)`` and k ``(B, Hkv, S, dh)`` as the layer uses them in its softmax, at their rotary
    embeddings ``q_pe`` / ``k_pe`` (rows of :func:`_gather_rows`).

    ``(cos, sin)``: the module's own rotary function (:func:`_rope`). Llama 4 (one complex tensor per row): its
    rotation of consecutive pairs, then the L2 norm of ``qk_norm``; its NoPE layers (``use_rope`` False) are not
    rotated and scale each query row by its temperature, log1p(floor((i + 1) / floor_scale)) * attn_scale + 1 at
    sequence index i (``query_index`` of a prefill on an empty cache)."""
    if not isinstance(q_pe, torch.Tensor):
        rope = _rope(attn)
        return rope(q, q, *q_pe)[0], rope(k, k, *k_pe)[1]
    if getattr(attn, "use_rope", True):

        def turn(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * pe[:, None].to(x.device)).flatten(-2).type_as(x)

        q, k = turn(q, q_pe), turn(k, k_pe)
    if hasattr(attn, "qk_norm"):
        q, k = attn.qk_norm(q), attn.qk_norm(k)
    return q, k


def _temperature(attn: Any, q: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """Llama 4's NoPE layers scale each query row by a temperature of its sequence index (see :func:`_rotate`);
    other layers: ``q`` unchanged."""
    if not getattr(attn, "attn_temperature_tuning", False) or getattr(attn, "use_rope", True):
        return q
    scale = torch.log1p(torch.floor((query_index.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
    return (q * scale[:, None, :, None]).to(q.dtype)


def _query_width(attn: Any, head_dim: int) -> int:
    """Channels per head of ``q_proj``'s output: ``head_dim``, or twice that where each head's query is followed by
    its output gate (Qwen3.5's gated attention: ``q_proj`` is ``2 * heads * head_dim`` wide)."""
    cfg = getattr(attn, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    out = getattr(attn.q_proj, "out_features", None)
    return 2 * head_dim if heads is not None and out == 2 * int(heads) * head_dim else head_dim


def _chunk_size(attn: Any) -> int | None:
    """The chunk of a chunked-attention layer (Llama 4: ``layer_types[i] == "chunked_attention"``), else None."""
    cfg = getattr(attn, "config", None)
    types = getattr(cfg, "layer_types", None) or ()
    idx = getattr(attn, "layer_idx", None)
    if cfg is None or idx is None or idx >= len(types) or types[idx] != "chunked_attention":
        return None
    return int(cfg.attention_chunk_size)


def uses_mrope(config: Any) -> bool:
    """Whether a text config's rotary embedding is multimodal (M-RoPE: several position axes, Qwen-VL)."""
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, name, None)
        if isinstance(rope, dict) and any("mrope" in str(key) for key in rope):
            return True
    return False


def pack_rows(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of every row, in order, padded: ``(index (B, M), valid (B, M))``.

    A compaction, not a ranking (stable sort of a 0/1 key). ``width`` defaults to the longest row.
    """
    m = int(mask.sum(1).max()) if width is None else width
    index = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :m]
    return index, mask.gather(1, index)


def query_attention(
    attn: Any,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of a few query rows over all keys, in one layer (causal, keys up to the query;
    in a sliding-window layer, ``attn.sliding_window`` set, only the last ``window`` entries up to the query; in a
    chunked-attention layer, Llama 4's, only the keys of the query's chunk, chunks counted from the first visible
    key as the LLM's own mask counts them past left padding).

    Computed from the attention module's input with its own projections and rotary embedding: O(Q*S*D) work, no
    (S x S) map.

    Args:
        attn: the decoder layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
        hidden: ``(B, S, D)`` the module's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)``, each ``(B or 1, S, head_dim)``, or Llama 4's complex
            ``(B or 1, S, head_dim / 2)``.
        query_index: Long ``(B, Q)`` sequence index of each query row.
        key_mask: optional Bool ``(B, S)`` (True = visible key, e.g. not padding).

    Returns:
        ``(B, Q, S)`` float32 attention probabilities (each row sums to 1 over its visible keys). A row that sees no
        key (the filler slot of a ragged set of query rows, e.g. at a padding position of a left-padded batch row)
        is all zeros, not NaN, so a masked sum over the rows stays finite.
    """
    b, s, _ = hidden.shape
    nq = query_index.shape[1]
    dh = int(attn.head_dim)
    pos = torch.arange(s, device=hidden.device)
    visible = pos[None, None, :] <= query_index[:, :, None]  # (B, Q, S)
    window = getattr(attn, "sliding_window", None)  # a sliding-window layer: the last `window` entries only
    if window:
        visible = visible & (pos[None, None, :] > query_index[:, :, None] - int(window))
    if key_mask is not None:
        visible = visible & key_mask.to(device=hidden.device, dtype=torch.bool)[:, None, :]
    chunk = _chunk_size(attn)
    if chunk:
        first = (
            torch.zeros(b, 1, device=hidden.device, dtype=torch.long)
            if key_mask is None
            else (key_mask.to(hidden.device).long().cumsum(1) == 0).sum(1, keepdim=True)
        )
        same = (pos[None, None, :] - first[..., None]) // chunk == ((query_index - first) // chunk)[..., None]
        visible = visible & same
    rows = torch.arange(b, device=hidden.device)[:, None]
    q = attn.q_proj(hidden[rows, query_index]).view(b, nq, -1, _query_width(attn, dh))[..., :dh]
    q = q.transpose(1, 2)  # (B, Hq, Q, dh)
    k = attn.k_proj(hidden).view(b, s, -1, dh).transpose(1, 2)  # (B, Hkv, S, dh)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    full = torch.arange(s, device=hidden.device)[None].expand(b, -1)
    q, k = _rotate(
        attn, q, k, _gather_rows(position_embeddings, query_index), _gather_rows(position_embeddings, full)
    )
    q = _temperature(attn, q, query_index)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * float(attn.scaling)  # (B, H, Q, S)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)
    return torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)


def last_token_attention(
    attn: Any,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of each sample's last (non-padding) token over all tokens, in one layer.

    :func:`query_attention` with one query row per sample: the last True entry of ``attention_mask``.

    Returns:
        ``(B, S)`` float32 attention probabilities.
    """
    b, s, _ = hidden.shape
    pos = torch.arange(s, device=hidden.device)
    if attention_mask is None:
        last = torch.full((b,), s - 1, device=hidden.device)
    else:
        m = attention_mask.to(device=hidden.device, dtype=torch.bool)
        last = torch.where(m, pos, -1).amax(dim=1).clamp_min(0)
    return query_attention(attn, hidden, position_embeddings, last[:, None], attention_mask)[:, 0]


def group_topk_keep(scores: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the ``counts[g]`` highest-scoring entries of every group g; entries with group -1 are always kept.

    The groups become rows of a table (entries in position order) and :func:`~globalcom2.core.select.topk_mask`
    picks the top ``counts[g]`` of row g (paper Eq. 6 applied per group), so ties keep the earlier position.
    Vectorised over the batch and groups.

    Args:
        scores: ``(B, S)``.
        groups: Long ``(B, S)``: group id >= 0 (ids unique across the batch), or -1 = always kept.
        counts: Long ``(G,)`` entries to keep per group.

    Returns:
        Bool ``(B, S)``.
    """
    flat_g = groups.reshape(-1)
    keep = flat_g < 0
    sel = (~keep).nonzero().reshape(-1)  # selectable positions, in position order
    if sel.numel() == 0:
        return keep.reshape(groups.shape)
    g = flat_g[sel]
    by_group = torch.sort(g, stable=True).indices  # grouped; position order inside each group
    g_sorted = g[by_group]
    size = torch.bincount(g_sorted, minlength=counts.numel())
    col = torch.arange(sel.numel(), device=sel.device) - (torch.cumsum(size, 0) - size)[g_sorted]
    num_groups, width = int(size.numel()), int(size.max())
    table = scores.new_full((num_groups, width), float("-inf"), dtype=torch.float32)
    table[g_sorted, col] = scores.reshape(-1)[sel[by_group]].float()
    valid = torch.zeros(num_groups, width, dtype=torch.bool, device=sel.device)
    valid[g_sorted, col] = True
    k = torch.zeros(num_groups, dtype=torch.long, device=sel.device)
    k[: counts.numel()] = counts.to(sel.device)
    chosen = topk_mask(table, k, valid)
    keep = keep.clone()
    keep[sel[by_group]] = chosen[g_sorted, col]
    return keep.reshape(groups.shape)


def image_ids(image_mask: torch.Tensor, layouts: list[ImageTokenLayout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index and region of every position, -1 / -2 off images; images fill placeholders in row-major order."""
    dev = image_mask.device
    image_of = torch.full(image_mask.shape, -1, dtype=torch.long, device=dev)
    region = torch.full(image_mask.shape, -2, dtype=torch.long, device=dev)
    lens = torch.tensor([lay.num_tokens for lay in layouts], device=dev)
    image_of[image_mask] = torch.repeat_interleave(torch.arange(len(layouts), device=dev), lens)
    region[image_mask] = torch.cat([lay.region for lay in layouts]).to(dev)
    return image_of, region


# -------------------------------------------------------------------------------------------- state


RECYCLED = -3  # region id of a token a method inserted (SparseVLM's recycled tokens)


@dataclass
class Selection:
    """What a method decides at a stage boundary.

    Attributes:
        keep: Bool ``(B, L)`` over the current sequence: True = the image entry survives (non-image entries are
            always kept; the pruner enforces it).
        extras: optional ``(B, C, D)`` hidden states of inserted tokens (they count as image tokens).
        extras_valid: Bool ``(B, C)`` which of ``extras`` exist.
        extras_after: Long ``(B,)`` current-sequence index after which the extras are inserted (a kept entry).
    """

    keep: torch.Tensor
    extras: torch.Tensor | None = None
    extras_valid: torch.Tensor | None = None
    extras_after: torch.Tensor | None = None


@dataclass
class _Call:
    """What the hooks know about the current language-model call.

    During a pruned prefill, ``entries`` holds per-entry attributes of the current (pruned) sequence, each
    ``(B, L)``: ``origin`` (full position, -1 for inserted tokens), ``valid`` (False on fillers), ``image``,
    ``owner`` (image index in the batch, -1 off images), ``region`` (layout region; -2 off images), ``attn``
    (the caller's padding mask), ``position`` (position id), plus any a method adds (e.g. ``rater``).
    """

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cache: Any = None
    active: bool = False  # a pruned prefill is running
    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> (B, L) scores
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific per-call values
    replace: dict[str, Any] = field(default_factory=dict)  # kwargs for the layers of the current stage
    full: torch.Tensor | None = None  # (B, S + 1, D) hidden states at drop time (last column: trash)
    num_image: torch.Tensor | None = None  # (B,) image tokens per sample in the unpruned prompt
    layouts: list[ImageTokenLayout] | None = None
    stage_counts: list[torch.Tensor] = field(default_factory=list)  # per stage: (num_images,) counts
    stages: list[_Stage] = field(default_factory=list)


@dataclass
class _Stage:
    """What decode steps need from one stage of the pruned prefill."""

    pruned_len: int  # length of the stage's pruned prompt (its layers' cache)
    prompt_mask: torch.Tensor | None  # (B, L_s) 2D mask of that prompt; None = all visible
    shift: torch.Tensor | None  # (B,) compact positions: decode positions are lowered by this


@dataclass
class _Prefill:
    cache: Any  # weakref to the cache object
    prompt_len: int  # S, the unpruned prompt length
    stages: list[_Stage]


class PrunerState(threading.local):
    """Per-forward state, one instance per thread (several threads may run one patched model).

    Attributes:
        call: the current language-model call (set by the LM's pre-hook, read by the layer hooks).
        pending_ids: ``input_ids`` of the current outer call, until the LM's pre-hook takes them.
        pending_inputs: the outer call's 2D ``attention_mask`` and ``token_type_ids`` (for LLMs that receive
            their masks prebuilt, e.g. Gemma 3's per-layer-type mapping), until the LM's pre-hook takes them.
        prefill: the last pruned prefill of this thread, for its decode steps.
        layouts: token layouts of the images of this thread's last encode (batch order).
        vision_plans: GlobalCom²'s plans of those images (the GlobalCom² combinations only).
        stage_scores: the scores of each stage of this thread's last pruned prefill.
        survivors: Bool ``(B, S)``: the prompt positions that reach the last stage of that prefill.
    """

    def __init__(self) -> None:
        self.call = _Call()
        self.pending_ids: torch.Tensor | None = None
        self.pending_inputs: dict[str, Any] = {}
        self.prefill: _Prefill | None = None
        self.layouts: list[ImageTokenLayout] | None = None
        self.vision_plans: list[Plan] | None = None
        self.stage_scores: list[torch.Tensor] = []
        self.survivors: torch.Tensor | None = None


class StageMethod(Protocol):
    """What a method gives the pruner (the adapters of FastV, PDrop, SparseVLM and the combinations)."""

    schedule: Schedule
    score_offset: int  # the scores of stage s come from layer K_s - score_offset (0 or 1)
    plan_mode: str  # recorded in Plan.mode

    def prepare(self, pruner: StagedPruner, hidden: torch.Tensor, call: _Call) -> None: ...

    def score(
        self, pruner: StagedPruner, stage: int, attn: Any, hidden: torch.Tensor, kwargs: dict, call: _Call
    ) -> torch.Tensor: ...

    def select(self, pruner: StagedPruner, stage: int, hidden: torch.Tensor, call: _Call) -> Selection: ...

    def plan_ratios(self, image: int) -> torch.Tensor | None: ...


_CACHE_KEYS = ("cache", "past_key_values")


def _cache_of(kwargs: dict) -> Any:
    for key in _CACHE_KEYS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def _attn2d(mask: Any) -> torch.Tensor | None:
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


# -------------------------------------------------------------------------------------------- the pruner


class StagedPruner:
    """Pruning hooks on the language model of a supported VLM (see the module docstring).

    Args:
        model: a supported VLM (its language model is :func:`language_model`).
        method: the :class:`StageMethod` (scores, selection, schedule).
        layouts_from_sizes: image sizes -> token layouts, for calls with precomputed image features.
        positions: ``"keep"`` or ``"compact"`` (module docstring).
        name: the method's name in warnings and errors.
    """

    def __init__(self, model: Any, method: StageMethod,
                 layouts_from_sizes: Callable[[Any], list[ImageTokenLayout] | None], *, positions: str = "keep",
                 name: str = "FastV") -> None:  # fmt: skip
        if positions not in ("keep", "compact"):
            raise ValueError(f"`positions` must be 'keep' or 'compact', got {positions!r}")
        self.model = model
        self.lm = language_model(model)
        self.layers = self.lm.layers
        self.method = method
        self.name = name
        # M-RoPE (Qwen-VL): an image token's position has several axes, and renumbering them "without gaps" has no
        # published meaning; every method keeps the original positions there (docs/llm_methods.md)
        self.positions = "keep" if uses_mrope(self.lm.config) else positions
        sched = method.schedule
        num_layers = len(self.layers)
        if sched.num_layers != num_layers:
            raise ValueError(f"{name}: schedule for {sched.num_layers} layers, the LLM has {num_layers}")
        self.boundaries = tuple(sched.boundaries)
        self.score_layers = tuple(k - method.score_offset for k in self.boundaries)
        for j in self.score_layers:
            if getattr(self.layers[j], "linear_attn", None) is not None:
                full = [
                    i for i, layer in enumerate(self.layers) if getattr(layer, "self_attn", None) is not None
                ]
                raise UnsupportedModelError(
                    f"{name} ranks image tokens by the attention of layer {j}, a linear-attention layer (Gated "
                    f"DeltaNet) that has no attention row; choose options whose scoring layers are full-attention "
                    f"layers ({', '.join(map(str, full))})"
                )
            attn = getattr(self.layers[j], "self_attn", None)
            missing = [a for a in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attn, a)]
            if missing or not hasattr(self.layers[j], "input_layernorm"):
                raise TypeError(
                    f"{name} needs Llama-style decoder layers (input_layernorm, self_attn with q_proj, k_proj, "
                    f"head_dim, scaling); {type(self.lm).__name__} layer {j} lacks {missing or ['input_layernorm']}"
                )
        self.layouts_from_sizes = layouts_from_sizes
        self.image_token_id = int(model.config.image_token_id)
        self.state = PrunerState()
        self.handle: GlobalComHandle | None = None
        from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask

        self._create_mask = create_causal_mask
        self._mask_functions = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING
        #: the attention kind of every decoder layer ("full_attention", "sliding_attention", ...), where the
        #: config names them; each kind gets its own mask for a pruned sequence
        self.layer_types = tuple(getattr(self.lm.config, "layer_types", None) or ())
        # rotary embeddings per layer kind (Gemma 3: local and global layers have their own bases)
        forward = getattr(getattr(self.lm, "rotary_emb", None), "forward", None)
        self._rotary_by_kind = forward is not None and "layer_type" in inspect.signature(forward).parameters
        self._warned: set[str] = set()

    @property
    def k(self) -> int:
        """K_1, the first pruned layer."""
        return self.boundaries[0]

    @property
    def last_scores(self) -> torch.Tensor | None:
        """``(B, S)`` first-stage scores of the calling thread's last pruned prefill."""
        return self.state.stage_scores[0] if self.state.stage_scores else None

    # -- installation --------------------------------------------------------------------------------------
    def install(self, handle: GlobalComHandle) -> None:
        self.handle = handle
        handle.add_hook(outer_model(self.model).register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        handle.add_hook(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        for j, layer in enumerate(self.layers):
            hook = functools.partial(self._layer_pre, j)
            handle.add_hook(layer.register_forward_pre_hook(hook, with_kwargs=True))
        handle.add_hook(self.layers[-1].register_forward_hook(self._scatter_back))

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- per-call context ----------------------------------------------------------------------------------
    def record_images(
        self, layouts: list[ImageTokenLayout] | None, vision_plans: list[Plan] | None = None
    ) -> None:
        """Token layouts (and GlobalCom²'s plans) of the images this thread just encoded."""
        self.state.layouts, self.state.vision_plans = layouts, vision_plans

    def _outer_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = self.state
        ids = kwargs.get("input_ids", args[0] if args else None)
        state.pending_ids = ids if isinstance(ids, torch.Tensor) else None
        types = kwargs.get("token_type_ids")
        state.pending_inputs = {
            "attention_mask": _attn2d(kwargs.get("attention_mask")),
            "token_type_ids": types if isinstance(types, torch.Tensor) else None,
        }
        if kwargs.get("pixel_values") is None and isinstance(kwargs.get("image_sizes"), torch.Tensor):
            # precomputed image features (mm_encoder_outputs): the sizes come with the call, not the packing
            self.record_images(self.layouts_from_sizes(kwargs["image_sizes"]))

    def _lm_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = self.state
        embeds = kwargs.get("inputs_embeds")
        ids, state.pending_ids = state.pending_ids, None
        outer, state.pending_inputs = state.pending_inputs, {}
        if ids is not None and embeds is not None and ids.shape != embeds.shape[:2]:
            ids = None
        mask = _attn2d(kwargs.get("attention_mask"))  # a prebuilt mapping: the outer call's 2D mask
        state.call = _Call(input_ids=ids, attention_mask=mask if mask is not None else outer.get("attention_mask"),
                           cache=_cache_of(kwargs))  # fmt: skip
        state.call.extra["token_type_ids"] = outer.get("token_type_ids")
        if ids is None and embeds is not None and state.prefill is None:
            self.warn_once(
                "embeds", f"{self.name}: the model was called with inputs_embeds only; image positions are unknown, "
                "nothing is pruned (call it with input_ids)",
            )  # fmt: skip

    def _start(self, hidden: torch.Tensor, kwargs: dict) -> bool:
        """At layer 0 of a prefill with images: set up the entries of the full sequence."""
        call = self.state.call
        ids = call.input_ids
        if ids is None or hidden.shape[1] != ids.shape[1]:
            return False
        image = ids.to(hidden.device) == self.image_token_id
        if not bool(image.any()):
            return False
        if call.cache is not None and call.cache.get_seq_length() > 0:  # HF's default: the first KV layer
            self.warn_once(
                "cache", f"{self.name}: prompt with images on a non-empty cache; nothing is pruned"
            )
            return False
        b, s, _ = hidden.shape
        dev = hidden.device
        layouts = self._layouts(image)
        if layouts is not None:
            owner, region = image_ids(image, layouts)
        else:
            owner = torch.where(image, torch.arange(b, device=dev)[:, None], -1)
            region = torch.where(image, 0, -2)
        pos = kwargs.get("position_ids")
        pos = torch.arange(s, device=dev)[None] if pos is None else pos
        attn = call.attention_mask
        call.entries = {
            "origin": torch.arange(s, device=dev)[None].expand(b, s),
            "valid": torch.ones(b, s, dtype=torch.bool, device=dev),
            "image": image,
            "owner": owner,
            "region": region,
            "attn": torch.ones(b, s, dtype=torch.bool, device=dev)
            if attn is None
            else attn.to(dev, torch.bool),
            "position": pos.to(dev).expand(b, s),
            "anchor": torch.arange(s, device=dev)[None].expand(b, s),  # whose rotary embedding (keep mode)
        }
        call.num_image = image.sum(1)
        call.layouts = layouts
        call.active = True
        self.state.stage_scores = []
        return True

    def pruned_entries(self) -> dict[str, torch.Tensor] | None:
        """This thread's per-entry records of the pruned sequence while a pruned prefill runs inside the LLM
        (``origin``, ``valid``, ``image``, ... each ``(B, L)``; see :class:`_Call`), else None (nothing pruned yet,
        decode, or after the last layer put the full length back)."""
        call = self.state.call
        return call.entries if call.active and call.full is not None else None

    def key_mask(self, call: _Call) -> torch.Tensor:
        """``(B, L)`` visible keys of the current sequence (not a filler, not padding)."""
        return call.entries["valid"] & call.entries["attn"]

    # -- every layer -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _layer_pre(self, j: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        call = state.call
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return None
        if j == 0:
            call.extra["position_ids"] = kwargs.get(
                "position_ids"
            )  # the caller's, before any stage shifts them
            if self._start(hidden, kwargs):
                self.method.prepare(self, hidden, call)
        if call.replace:
            kwargs.update(call.replace)
            self._per_kind(j, kwargs)
        if call.active and self.positions == "keep":
            # this layer's own rotary embedding (layer types may differ: local / global) at the kept positions
            call.extra["layer_pe"] = kwargs["position_embeddings"]  # full length, as the LM computed it
            if call.full is not None:
                kwargs["position_embeddings"] = _gather_rows(call.extra["layer_pe"], call.entries["anchor"])
        if call.active:
            # a stage scored in its own first layer (PDrop) ranks before that layer prunes; a stage scored in
            # the layer before its first (FastV, SparseVLM) sees that layer's own stage, pruned first
            prune_first = self.method.score_offset > 0
            if prune_first and j in self.boundaries:
                hidden = self._prune(self.boundaries.index(j), hidden, kwargs)
                self._per_kind(j, kwargs)
            if j in self.score_layers:
                s = self.score_layers.index(j)
                normed = module.input_layernorm(hidden)
                call.scores[s] = self.method.score(self, s, module.self_attn, normed, kwargs, call)
                if s == len(state.stage_scores):
                    state.stage_scores.append(call.scores[s])
            if not prune_first and j in self.boundaries:
                hidden = self._prune(self.boundaries.index(j), hidden, kwargs)
        elif j in self.boundaries:
            self._decode_mask(self.boundaries.index(j), hidden, kwargs)
        self._per_kind(j, kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _per_kind(self, j: int, kwargs: dict) -> None:
        """Layer j's own mask and rotary embedding where the stage's are given per layer kind (see _mask, _rotary)."""
        for key in ("attention_mask", "position_embeddings"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = kwargs[key][self.layer_types[j]]

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """The LLM's rotary ``(cos, sin)`` at ``positions``; ``{layer kind: (cos, sin)}`` where each kind has its
        own (resolved per layer by :meth:`_layer_pre`)."""
        if self._rotary_by_kind:
            return {
                kind: self.lm.rotary_emb(hidden, positions, kind) for kind in dict.fromkeys(self.layer_types)
            }
        return self.lm.rotary_emb(hidden, positions)

    def stage_layers(self, s: int) -> range:
        """The decoder layers of stage s: K_s up to (not including) K_{s+1}, the last stage up to L."""
        end = self.boundaries[s + 1] if s + 1 < len(self.boundaries) else len(self.layers)
        return range(self.boundaries[s], end)

    def _mask(self, s: int, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any,
              entries: dict[str, torch.Tensor] | None = None) -> Any:  # fmt: skip
        """The ``attention_mask`` the layers of stage s receive for the current (pruned) sequence.

        The family's own masks where it builds them (``pruned_llm_masks`` of the adapter, e.g. Gemma 3's
        bidirectional image runs), else the LLM's mask of each layer kind (causal, sliding window, ...: the
        ``layer_types`` of its config) rebuilt for the shorter sequence, each sized against the stage's first layer
        of that kind (its cache). Several kinds: a ``{kind: mask}`` mapping that :meth:`_layer_pre` resolves per
        layer. ``position_ids`` are not passed: kept positions jump, which the mask code would read as packed
        sequences, so a sliding window counts entries of the pruned sequence.
        """
        layers = self.stage_layers(s)
        hook = getattr(self.method, "pruned_llm_masks", None)
        masks = None if hook is None else hook(self.lm, hidden, mask2d, cache, layers, entries,
                                                  self.state.call.extra.get("token_type_ids"))  # fmt: skip
        if masks is not None:
            return masks
        if not self.layer_types:
            return self._create_mask(self.lm.config, hidden, mask2d, cache, layer_idx=layers[0])
        built: dict[str, Any] = {}
        for j in layers:
            kind = self.layer_types[j]
            if kind not in built:
                create = self._mask_functions.get(kind, self._create_mask)
                built[kind] = create(self.lm.config, hidden, mask2d, cache, layer_idx=j)
        return next(iter(built.values())) if len(built) == 1 else built

    def _decode_mask(self, s: int, hidden: torch.Tensor, kwargs: dict) -> None:
        state = self.state
        call = state.call
        pre = state.prefill
        cache = _cache_of(kwargs)
        if pre is None or cache is None or pre.cache() is not cache or s >= len(pre.stages):
            return
        stage = pre.stages[s]
        layer = self.boundaries[s]
        b, q = hidden.shape[:2]
        cache_len = self._cached_tokens(cache, pre, s, q)
        attn2d = call.attention_mask
        lp = stage.pruned_len
        if attn2d is None and stage.prompt_mask is None:
            mask2d = None
        else:
            prompt = stage.prompt_mask
            if prompt is None:
                prompt = torch.ones(b, lp, dtype=torch.bool, device=hidden.device)
            after = (
                attn2d[:, pre.prompt_len :].to(torch.bool)
                if attn2d is not None
                else torch.ones(b, cache_len + q - lp, dtype=torch.bool, device=hidden.device)
            )
            mask2d = torch.cat([prompt.to(hidden.device), after.to(hidden.device)], dim=1)
            if mask2d.shape[1] != cache_len + q:
                raise RuntimeError(
                    f"{self.name}: the cache of layer {layer} holds {cache_len} tokens but the attention mask "
                    f"implies {mask2d.shape[1] - q}; was the cache reordered (beam search is not supported)?"
                )
        call.replace["attention_mask"] = self._mask(s, hidden, mask2d, cache)
        if stage.shift is not None:
            pos = call.extra.get("position_ids")
            if pos is None:
                pos = torch.arange(cache_len, cache_len + q, device=hidden.device)[None]
            pos = pos.to(hidden.device).expand(b, -1) - stage.shift[:, None]
            call.replace["position_ids"] = pos
            call.replace["position_embeddings"] = self._rotary(hidden, pos)
        kwargs.update(call.replace)

    def _cached_tokens(self, cache: Any, pre: _Prefill, s: int, q: int) -> int:
        """Tokens the KV caches of stage s's layers hold before this decode step's ``q`` tokens (called at the
        stage's first layer): read off its first layer with a KV cache; a stage of linear-attention layers only (a
        recurrent state, no length: Qwen3.5) counts its pruned prompt plus the tokens decoded since, read off
        another layer (one before the stage already holds this step's tokens)."""
        kv = [j for j, layer in enumerate(self.layers) if getattr(layer, "linear_attn", None) is None]
        own = [j for j in kv if j in self.stage_layers(s)]
        if own or not kv:
            return int(cache.get_seq_length(own[0] if own else self.boundaries[s]))
        j = kv[0]
        stage_j = [t for t, k in enumerate(self.boundaries) if k <= j]
        prompt = pre.stages[stage_j[-1]].pruned_len if stage_j else pre.prompt_len
        ran = q if j < self.boundaries[s] else 0
        return pre.stages[s].pruned_len + int(cache.get_seq_length(j)) - ran - prompt

    # -- a stage boundary in prefill -------------------------------------------------------------------------
    def _prune(self, s: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        call = self.state.call
        ent = call.entries
        b, length, d = hidden.shape
        dev = hidden.device
        sel = self.method.select(self, s, hidden, call)
        valid, image = ent["valid"], ent["image"]
        keep = valid & (sel.keep | ~image)
        removed = valid & ~keep
        if call.full is None:  # first boundary: the full-length record of hidden states (+ a trash column)
            call.full = torch.cat([hidden, hidden.new_zeros(b, 1, d)], dim=1)
        else:
            full_len = call.full.shape[1] - 1
            dest = torch.where(removed & (ent["origin"] >= 0), ent["origin"], full_len)
            call.full.scatter_(1, dest[..., None].expand(-1, -1, d), hidden)
        # new order: fillers first (a shorter row is left-padded, as the caller's batch: every row's real entries end
        # the sequence, so a sliding-window layer's cache keeps the same last tokens of each row as alone), then the
        # kept entries in order, inserted tokens right after ``extras_after``
        filler = -1
        ar = torch.arange(length, device=dev)
        key = torch.where(keep, 2 * ar[None], filler)
        num_extra = torch.zeros(b, dtype=torch.long, device=dev)
        cat = dict(ent)
        hid = hidden
        if sel.extras is not None and sel.extras_valid is not None and sel.extras_after is not None:
            c = sel.extras.shape[1]
            ev = sel.extras_valid.to(dev)
            after = sel.extras_after.to(dev)
            num_extra = ev.sum(1)
            key = torch.cat([key, torch.where(ev, 2 * after[:, None] + 1, filler)], dim=1)
            hid = torch.cat([hidden, sel.extras.to(hidden.dtype)], dim=1)
            last_owner = torch.where(image, ent["owner"], -1).amax(dim=1)
            fill = {"origin": -1, "image": True, "region": RECYCLED, "attn": True}
            for name, t in ent.items():
                if name == "valid":
                    cat[name] = torch.cat([keep, ev], dim=1)
                elif name == "owner":
                    cat[name] = torch.cat([t, last_owner[:, None].expand(b, c)], dim=1)
                elif name == "anchor":  # an inserted token takes the rotary position of the token it follows
                    cat[name] = torch.cat([t, t.gather(1, after[:, None]).expand(b, c)], dim=1)
                elif name != "position":
                    cat[name] = torch.cat(
                        [t, torch.full((b, c), fill.get(name, 0), dtype=t.dtype, device=dev)], 1
                    )
        else:
            cat["valid"] = keep
            after = None
        new_len = int((keep.sum(1) + num_extra).max())
        order = torch.sort(key, dim=1, stable=True).indices[:, key.shape[1] - new_len :]
        new_pos = self._positions(ent["position"], removed, num_extra, after, ar, sel, order)
        new = {name: t.gather(1, order) for name, t in cat.items() if name != "position"}
        new["position"] = new_pos
        hidden_p = hid.gather(1, order[..., None].expand(-1, -1, d))
        call.entries = new
        # what the layers of this stage see
        mask2d: torch.Tensor | None = new["valid"] & new["attn"]
        if call.attention_mask is None and bool(new["valid"].all()):
            mask2d = None
        cache = _cache_of(kwargs)
        call.replace = {
            "attention_mask": self._mask(s, hidden_p, mask2d, cache, new),
            "position_ids": new_pos,
        }
        if self.positions == "keep":  # every later layer gathers its own (see _layer_pre)
            kwargs["position_embeddings"] = _gather_rows(call.extra["layer_pe"], new["anchor"])
        else:
            call.replace["position_embeddings"] = self._rotary(hidden_p, new_pos)
        kwargs.update(call.replace)
        shift = None
        if self.positions == "compact":
            prev = call.stages[-1].shift if call.stages else None
            shift = (0 if prev is None else prev) + removed.sum(1) - num_extra
        call.stages.append(_Stage(pruned_len=new_len, prompt_mask=mask2d, shift=shift))
        call.stage_counts.append(self._image_counts(new))
        if s == len(self.boundaries) - 1:
            self._finish_prefill(cache, length if s == 0 else call.full.shape[1] - 1)
        return hidden_p

    def _positions(self, position: torch.Tensor, removed: torch.Tensor, num_extra: torch.Tensor,
                   after: torch.Tensor | None, ar: torch.Tensor, sel: Selection,
                   order: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Position ids of the new sequence (``keep``: gathered; ``compact``: renumbered without gaps)."""
        if self.positions == "keep":  # inserted tokens: the position of the token they follow
            if after is None or sel.extras_valid is None:
                return position.gather(1, order)
            extra = position.gather(1, after[:, None]).expand(-1, sel.extras_valid.shape[1])
            return torch.cat([position, extra], dim=1).gather(1, order)
        pos = position - torch.cumsum(removed.long(), dim=1)
        if after is None or sel.extras_valid is None:
            return pos.gather(1, order)
        c = sel.extras_valid.shape[1]
        extra_pos = pos.gather(1, after[:, None]) + 1 + torch.arange(c, device=pos.device)[None]
        pos = pos + num_extra[:, None] * (ar[None] > after[:, None])
        return torch.cat([pos, extra_pos], dim=1).gather(1, order)

    def _image_counts(self, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image tokens of every image in the current sequence (inserted ones counted with their owner)."""
        owner = entries["owner"][entries["valid"] & entries["image"]]
        num = len(self.state.call.layouts) if self.state.call.layouts is not None else 0
        return torch.bincount(owner.clamp_min(0), minlength=num).cpu()

    def _finish_prefill(self, cache: Any, prompt_len: int) -> None:
        state = self.state
        call = state.call
        state.prefill = (
            _Prefill(weakref.ref(cache), prompt_len=prompt_len, stages=list(call.stages))
            if cache is not None
            else None
        )
        plans = self._plans()
        if plans is not None and self.handle is not None:
            self.handle.publish(plans)

    def _plans(self) -> list[Plan] | None:
        """One `Plan` per image: the tokens that reach the last stage, and the image tokens of every layer."""
        call = self.state.call
        ent = call.entries
        b = ent["valid"].shape[0]
        full_len = int(call.entries["origin"].amax()) + 1 if call.full is None else call.full.shape[1] - 1
        alive = torch.zeros(b, full_len + 1, dtype=torch.bool, device=ent["valid"].device)
        dest = torch.where(ent["valid"] & (ent["origin"] >= 0), ent["origin"], full_len)
        alive.scatter_(1, dest, True)
        self.state.survivors = alive[:, :full_len]
        layouts = call.layouts
        if layouts is None:
            return None
        image = call.input_ids.to(alive.device) == self.image_token_id if call.input_ids is not None else None
        if image is None:
            return None
        flat = alive[:, :full_len][image].cpu()
        counts = torch.stack(call.stage_counts, dim=1) if call.stage_counts else None  # (images, stages)
        plans, start = [], 0
        sched = self.method.schedule
        for i, lay in enumerate(layouts):  # one step per image
            plan = plan_from_keep(
                lay,
                flat[start : start + lay.num_tokens],
                self.method.plan_ratios(i),
                mode=self.method.plan_mode,
            )
            if counts is not None:
                per_stage = [int(v) for v in counts[i]]
                plan.num_tokens = per_stage[-1]
                plan.layer_tokens = tuple(
                    lay.num_tokens if j < self.boundaries[0]
                    else per_stage[max(t for t, k in enumerate(self.boundaries) if k <= j)]
                    for j in range(sched.num_layers)
                )  # fmt: skip
            plans.append(plan)
            start += lay.num_tokens
        return plans

    # -- the last layer: back to full length -----------------------------------------------------------------
    def _scatter_back(self, module: Any, args: tuple, output: Any) -> Any:
        call = self.state.call
        if not call.active or call.full is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        ent = call.entries
        full = call.full
        full_len = full.shape[1] - 1
        dest = torch.where(ent["valid"] & (ent["origin"] >= 0), ent["origin"], full_len)
        full = full.scatter(1, dest[..., None].expand(-1, -1, full.shape[-1]), out.to(full.dtype))[
            :, :full_len
        ]
        call.active = False
        call.full = None
        call.entries = {}
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # -- images ----------------------------------------------------------------------------------------------
    def _layouts(self, image_mask: torch.Tensor) -> list[ImageTokenLayout] | None:
        """Token layouts of the images of this call, in batch order (None when they do not fit the call, or when
        the family's layout is not known: then only the image-token positions are used)."""
        layouts = self.state.layouts
        if layouts is None and not getattr(self.method, "records_layouts", True):
            return None
        if layouts is None or sum(lay.num_tokens for lay in layouts) != int(image_mask.sum()):
            self.warn_once(
                "layout", f"{self.name}: the images seen by the vision tower do not account for the image tokens "
                "of this call; per-image plans are not recorded",
            )  # fmt: skip
            return None
        return layouts

    def stage_count(self, s: int, call: _Call) -> torch.Tensor:
        """``(B,)`` image tokens each sample keeps in stage s: floor(n_b * share_s) of its unpruned n_b."""
        assert call.num_image is not None
        return (call.num_image.double() * self.method.schedule.shares[s]).floor().long()


# -------------------------------------------------------------------------------------------- the adapter base


class LLMPruningAdapter:
    """The shared vision side of every LLM-side method, on any family: all tokens reach the LLM, layouts recorded.

    A mixin: :func:`llm_method_class` puts it (with the method's own class) in front of a family adapter, so the
    family keeps its checks, its tile-grid channel and its placeholder checks while this class swaps out what the
    LLM-side methods change: no vision-side scoring (unless the method needs GlobalCom²'s plans) and no processor
    patch (the LLM receives every token, so the plain processor's prompts fit). The family's selection step hands
    every token on unchanged and records each image's token layout for :class:`StagedPruner`, whose hooks prune
    inside the LLM: :class:`AnyresLLMSide` (``pack_image_features``) or :class:`TileLLMSide` (the tile planner).
    A family with neither is served by :class:`PositionsOnly`: the pruner then uses the image-token positions alone
    (no per-image plans), which is all FastV, PDrop and SparseVLM need.

    A method subclass sets ``schedule`` (before calling :meth:`build_pruner`) and overrides :meth:`select` (and
    :meth:`score` / :meth:`prepare` where its scores are not the last prompt token's). After a forward,
    ``handle.plans`` hold the tokens that reach the last stage and ``Plan.layer_tokens`` the image tokens of every
    layer. ``uses_vision_plans``: the method also needs GlobalCom²'s plans (the combinations).
    """

    schedule: Schedule
    score_offset = 1
    plan_mode = "fastv"
    positions = "keep"
    display_name = "FastV"
    uses_vision_plans = False
    records_layouts = True
    encodes_first = False  # the prompts keep every placeholder: nothing to move before the call
    model: Any
    processor: Any
    config: Any
    pruner: StagedPruner

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)  # type: ignore[call-arg]  # the family adapter's

    def build_pruner(self) -> StagedPruner:
        self.pruner = StagedPruner(self.model, self, self.layouts_from_sizes, positions=self.positions,
                                   name=self.display_name)  # fmt: skip
        return self.pruner

    # -- checks and installation ---------------------------------------------------------------------------
    def check(self) -> None:
        needs = self.uses_vision_plans or self.needs_processor()  # type: ignore[attr-defined]
        if self.processor is None and not needs:  # the LLM receives every token: the processor is not patched
            self.check_model()  # type: ignore[attr-defined]
        else:
            super().check()  # type: ignore[misc]

    def install_scoring(self, handle: GlobalComHandle) -> None:
        """The scores come from inside the LLM: no vision-side scoring hook, unless GlobalCom²'s plans are needed."""
        if self.uses_vision_plans:
            super().install_scoring(handle)  # type: ignore[misc]

    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        """The LLM receives every token: the processor keeps HF's count."""

    def install_family(self, handle: GlobalComHandle) -> None:
        super().install_family(handle)  # type: ignore[misc]
        self.pruner.install(handle)
        self.install_pruner_hooks(handle, self.pruner)  # type: ignore[attr-defined]

    def layouts_from_sizes(self, image_sizes: Any) -> list[ImageTokenLayout] | None:
        """Layouts of images from their sizes alone (calls with precomputed image features); None: unknown."""
        return None

    def check_layout(self, layout: ImageTokenLayout, num_tokens: int, what: str) -> None:
        if layout.num_tokens != num_tokens:
            raise RuntimeError(
                f"{self.display_name}: the model produced {num_tokens} tokens for {what}, the geometry gives "
                f"{layout.num_tokens}; this transformers version packs differently"
            )

    # -- the LLM side -----------------------------------------------------------------------------------------
    def prepare(self, pruner: StagedPruner, hidden: torch.Tensor, call: _Call) -> None:
        """Called at layer 0 of a pruned prefill with the input embeddings (SparseVLM picks its raters here)."""

    def score(self, pruner: StagedPruner, stage: int, attn: Any, hidden: torch.Tensor, kwargs: dict,
              call: _Call) -> torch.Tensor:  # fmt: skip
        """``(B, L)`` head-mean attention of the last prompt token (FastV, PDrop)."""
        return last_token_attention(attn, hidden, kwargs["position_embeddings"], pruner.key_mask(call))

    def select(self, pruner: StagedPruner, stage: int, hidden: torch.Tensor, call: _Call) -> Selection:
        """Per sample, the ``floor(n_b * share_s)`` image entries with the highest scores (ties: earlier first)."""
        ent = call.entries
        b = hidden.shape[0]
        cand = ent["image"] & ent["valid"]
        groups = torch.where(cand, torch.arange(b, device=hidden.device)[:, None], -1)
        keep = group_topk_keep(call.scores[stage], groups, pruner.stage_count(stage, call))
        return Selection(keep & cand)

    def plan_ratios(self, image: int) -> torch.Tensor | None:
        """r_j recorded in image ``image``'s plan: GlobalCom²'s for the combinations, else None (the achieved
        share per crop)."""
        vision = self.pruner.state.vision_plans
        return vision[image].crop_ratios if self.uses_vision_plans and vision is not None else None


def _everything(layouts: list[ImageTokenLayout], mode: str) -> list[Plan]:
    return [plan_from_keep(lay, torch.ones(lay.num_tokens, dtype=torch.bool), mode=mode) for lay in layouts]


class AnyresLLMSide(LLMPruningAdapter):
    """The LLM-side methods' vision side on the anyres families (LLaVA-NeXT, OneVision): HF's packing runs
    unchanged and each image's layout (:func:`~globalcom2.methods.layout.image_token_layout`) is recorded."""

    def num_image_tokens(self, height: int, width: int) -> int:
        return self.geometry((height, width)).num_tokens(None)  # type: ignore[attr-defined]

    def select_packed(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                      arguments: dict[str, Any]) -> tuple[list[Plan], list[torch.Tensor]]:  # fmt: skip
        layouts = self.image_layouts(packed, arguments)
        vision = super().select_packed(handle, packed, arguments)[0] if self.uses_vision_plans else None  # type: ignore[misc]
        self.pruner.record_images(layouts, vision)
        return _everything(layouts, self.plan_mode), list(packed)

    def image_layouts(self, packed: list[torch.Tensor], arguments: dict[str, Any]) -> list[ImageTokenLayout]:
        newline = arguments.get("image_newline") is not None
        options = self.geometry_options(arguments)  # type: ignore[attr-defined]
        sizes = image_sizes_list(arguments["image_sizes"])
        layouts = []
        for feats, seq, size in zip(arguments["image_features"], packed, sizes, strict=True):
            if int(feats.shape[0]) == 1:
                lay = single_tile_layout(self.g, newline)  # type: ignore[attr-defined]
            else:
                lay = image_token_layout(self.geometry(size, **options), newline)  # type: ignore[attr-defined]
            self.check_layout(lay, int(seq.shape[0]), f"an image of {size[0]}x{size[1]}")
            layouts.append(lay)
        return layouts

    def layouts_from_sizes(self, image_sizes: Any) -> list[ImageTokenLayout] | None:
        return [image_token_layout(self.geometry(size)) for size in image_sizes_list(image_sizes)]  # type: ignore[attr-defined]


class TileLLMSide(LLMPruningAdapter):
    """The LLM-side methods' vision side on the tile families (InternVL, Idefics3/SmolVLM): the tile planner keeps
    every token in the model's order and records each image's layout
    (:func:`~globalcom2.methods.layout.tile_token_layout`); the markers between runs are not image tokens."""

    def num_image_tokens_for_grid(self, grid: tuple[int, int]) -> int:
        from ..adapters.internvl import num_tiles

        return num_tiles(*grid) * self.g * self.g  # type: ignore[attr-defined]

    def plan_images(self, tile_scores: Any, grids: Any) -> list[tuple[Plan, torch.Tensor]]:
        first = bool(getattr(self, "thumbnail_first", False))
        layouts = [tile_token_layout(tuple(grid), self.g, first) for grid in grids]  # type: ignore[attr-defined]
        for lay, scores, grid in zip(layouts, tile_scores, grids, strict=True):
            self.check_layout(lay, int(scores.numel()), f"an image of {grid[0]}x{grid[1]} crops")
        vision = None
        if self.uses_vision_plans:
            vision = [plan for plan, _ in super().plan_images(tile_scores, grids)]  # type: ignore[misc]
        self.pruner.record_images(layouts, vision)
        device = tile_scores[0].device if len(tile_scores) else None
        return [(plan, torch.arange(plan.num_tokens, device=device))
                for plan in _everything(layouts, self.plan_mode)]  # fmt: skip

    def after_encode(self, handle: GlobalComHandle, out: Any, extra: dict) -> Any:
        if not self.uses_vision_plans:
            # no scoring hook ran: zero scores of the tiles' shape, which the planner above only counts (this
            # thread's state, as a hook would record)
            features = getattr(out, self.feature_field)  # type: ignore[attr-defined]
            flat = torch.cat(list(features)) if not isinstance(features, torch.Tensor) else features
            tokens = self.g * self.g  # type: ignore[attr-defined]
            handle.state.scores = [flat.new_zeros(flat.numel() // (flat.shape[-1] * tokens), tokens)]
        return super().after_encode(handle, out, extra)  # type: ignore[misc]


class NativeLLMSide(LLMPruningAdapter):
    """The LLM-side methods' vision side on the native-resolution families (Qwen-VL): the merger's output reaches
    the LLM unchanged, every token at the M-RoPE position of the uncompressed run (HF's own ``get_rope_index``:
    the family's wrapper for dropped tokens is not installed), and each image's layout is recorded
    (:func:`~globalcom2.methods.layout.native_token_layout`: raster order, the crops are the regions of the
    family's rule); the combinations take GlobalCom²'s per-region counts from the family's planner. The pruner
    keeps every surviving token's position (no renumbering under M-RoPE)."""

    def install_family(self, handle: GlobalComHandle) -> None:
        self.pruner.install(handle)
        self.install_pruner_hooks(handle, self.pruner)  # type: ignore[attr-defined]

    def _select(self, handle: GlobalComHandle, features: tuple, deepstack: list | None,
                grids: list[tuple[int, int]]) -> tuple[tuple, list | None]:  # fmt: skip
        from ..adapters.qwen import region_tokens_of

        g = region_tokens_of(self.config)
        layouts = [native_token_layout(h, w, g) for h, w in grids]
        for lay, f, (h, w) in zip(layouts, features, grids, strict=True):
            self.check_layout(lay, int(f.shape[0]), f"an image of {h}x{w} merged tokens")
        vision = None
        if self.uses_vision_plans:
            vision = [plan for plan, _ in self.plan_images(list(features), grids)]  # type: ignore[attr-defined]
        self.pruner.record_images(layouts, vision)
        handle.publish(_everything(layouts, self.plan_mode))
        return features, deepstack


class PositionsOnly(LLMPruningAdapter):
    """The LLM-side methods on a family whose token layout this module does not know: nothing outside the LLM is
    patched; the pruner uses the image-token positions alone (``input_ids == image_token_id``), so markers are
    never pruned and each sample's image tokens are ranked together; no per-image plans are recorded."""

    records_layouts = False

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        self.model, self.processor, self.config = model, processor, config

    def check(self) -> None:
        if getattr(self.model.config, "image_token_id", None) is None:
            raise UnsupportedModelError(
                f"{self.display_name}: {type(self.model).__name__} has no config.image_token_id, so its image tokens "
                "cannot be located"
            )

    def install(self, handle: GlobalComHandle) -> None:
        self.pruner.install(handle)


def has_token_layout(family: type) -> bool:
    """Whether :mod:`globalcom2.methods.layout` knows the token layout of ``family``'s image runs (anyres or tiles)."""
    from ..adapters.internvl import InternVLAdapter
    from ..adapters.qwen import QwenAdapter

    return issubclass(family, (AnyresAdapter, InternVLAdapter, QwenAdapter))


def llm_method_class(method: type, family: type) -> type:
    """The adapter class of an LLM-side ``method`` on ``family`` (see :class:`LLMPruningAdapter`)."""
    return _llm_method_class(method, family)


@functools.cache
def _llm_method_class(method: Any, family: Any) -> type:
    from ..adapters.internvl import InternVLAdapter
    from ..adapters.qwen import QwenAdapter

    if issubclass(family, AnyresAdapter):
        side: type = AnyresLLMSide
    elif issubclass(family, InternVLAdapter):
        side = TileLLMSide
    elif issubclass(family, QwenAdapter):
        side = NativeLLMSide
    else:
        if method.uses_vision_plans:
            raise UnsupportedModelError(
                f"{method.display_name} needs the token layout of {family.model_class_name}, which is not known"
            )
        return type(f"{method.__name__}PositionsOnly", (method, PositionsOnly), {})
    return type(f"{method.__name__}On{family.__name__}", (method, side, family), {})


__all__ = [
    "AnyresLLMSide",
    "LLMPruningAdapter",
    "NativeLLMSide",
    "PositionsOnly",
    "TileLLMSide",
    "has_token_layout",
    "language_model",
    "llm_method_class",
    "num_llm_layers",
    "PrunerState",
    "Selection",
    "StageMethod",
    "StagedPruner",
    "group_topk_keep",
    "image_ids",
    "last_token_attention",
    "pack_rows",
    "query_attention",
]
