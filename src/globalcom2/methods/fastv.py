"""FastV (Chen et al., ECCV 2024) and GlobalCom² + FastV (paper Sec. 5.3, Fig. 8) inside a Hugging Face LLM.

FastV prunes image tokens *inside* the LLM: layers 0..K-1 see every token; the head-mean attention that the last
prompt token pays to each image token in layer K-1 ranks them; layers K..L-1 see only the top share. As in the
official FastV code, the scores are layer K-1's softmax attention probabilities (its attention row of the last
token, averaged over heads) and kept tokens keep their original positions (RoPE).

Only layer K-1 needs attention weights, and only one row of them: a forward pre-hook on its attention module
recomputes ``q`` for the last prompt token and ``k`` for all tokens from that module's own projections and rotary
embedding (our [CLS]-row trick, :mod:`globalcom2.core.scores`, applied to the LLM), so every layer keeps SDPA /
Flash attention and nothing asks for ``output_attentions``.

Pruning is done with forward pre-hooks on the decoder layers K..L-1 (no copy of ``LlamaModel.forward``):

- **prefill** (the call whose ``input_ids`` hold image placeholders): layer K's hook gathers the kept positions of
  the hidden states, rotary ``(cos, sin)`` and ``position_ids`` and builds the causal mask of the shorter sequence
  against layer K's cache (``create_causal_mask(..., layer_idx=K)``); layers K+1.. reuse them. Layers >= K
  therefore store only the kept tokens in the KV cache. A forward hook on the last layer scatters the outputs back
  to the full length, dropped tokens carrying their layer-K input (they "exit early"), so ``forward`` returns
  logits for every input position (labels stay aligned) and ``generate`` sees the last token as usual.
- **decode** (later calls with the same cache object): layers >= K get a causal mask built from the pruned prompt
  plus the new tokens, sized against their own (shorter) cache; positions are untouched.

Samples of a batch can keep different numbers of tokens (different image sizes); the pruned batch is padded to the
longest with dropped tokens that are masked out as keys and restored afterwards, so every sample's result equals
its result alone. Counts: FastV keeps int(r * n_b) of the n_b image tokens (newlines included) of sample b, with
r = R, or with ``equivalent=True`` r = (R*L - K) / (L - K), which makes the average image-token count over all L
layers equal R (the "equivalent token count" of the paper's comparisons). GlobalCom² + FastV keeps exactly the
GlobalCom² budget-mode counts: int(N*R) thumbnail tokens and k_j tokens of crop j, split by the adaptive r_j of
Eq. 2-4 from the vision tower's [CLS] scores, with FastV's scores choosing *which* tokens inside each region;
newline tokens are always kept.

Both methods are LLaVA-NeXT adapters (:class:`FastVAdapter`, :class:`GlobalComFastVAdapter`) installed by the one
install path (:func:`globalcom2.adapters.base.install`): HF's packing runs unchanged and hands the LLM every token;
the adapter records each image's token layout (and, for GlobalCom² + FastV, GlobalCom²'s plan from the shared
scoring hook and :func:`~globalcom2.core.select.select_tokens`) for the pruner. Every per-forward value the hooks
pass on lives in a per-thread state, so several threads can run ``generate`` on one patched model; every top-k
ranks by :func:`~globalcom2.core.select.topk_mask` (ties: the earlier position wins).

Tested with Llama decoders under SDPA and eager attention, transformers 5.19 and 5.24; beam search (cache
reordering) is not supported.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import GlobalComHandle
from ..adapters.llava_next import LlavaNextAdapter
from ..core.plan import Plan
from ..core.ranking import topk_mask
from .layout import NEWLINE, ImageTokenLayout, image_token_layout, plan_from_keep, single_tile_layout
from .vision import image_sizes_list

# -------------------------------------------------------------------------------------------- pure pieces


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(attn: Any):
    """The rotary function of the attention module's own modelling file (Llama-style fallback)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn

    def apply(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    return apply


def last_token_attention(
    attn: Any,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of each sample's last (non-padding) token over all tokens, in one layer.

    Computed from the attention module's input with its own projections and rotary embedding, for one query per
    sample: O(S*D) work, no (S x S) map.

    Args:
        attn: the decoder layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
        hidden: ``(B, S, D)`` the module's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)``, each ``(B or 1, S, head_dim)``.
        attention_mask: optional Bool/0-1 ``(B, S)`` padding mask (1 = real token).

    Returns:
        ``(B, S)`` float32 attention probabilities (rows sum to 1 over the visible keys).
    """
    b, s, _ = hidden.shape
    dh = int(attn.head_dim)
    pos = torch.arange(s, device=hidden.device)
    if attention_mask is None:
        last = torch.full((b,), s - 1, device=hidden.device)
        visible = pos[None, :].expand(b, s) >= 0
    else:
        m = attention_mask.to(device=hidden.device, dtype=torch.bool)
        last = torch.where(m, pos, -1).amax(dim=1).clamp_min(0)
        visible = m
    visible = visible & (pos[None, :] <= last[:, None])
    rows = torch.arange(b, device=hidden.device)
    q = attn.q_proj(hidden[rows, last][:, None]).view(b, 1, -1, dh).transpose(1, 2)  # (B, Hq, 1, dh)
    k = attn.k_proj(hidden).view(b, s, -1, dh).transpose(1, 2)  # (B, Hkv, S, dh)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    rope = _rope(attn)
    q, _ = rope(q, q, cos[rows, last][:, None], sin[rows, last][:, None])
    _, k = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * float(attn.scaling)  # (B, H, S)
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


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


def layer_ratio(ratio: float, layer: int, num_layers: int, equivalent: bool) -> float:
    """Share of image tokens FastV keeps from layer K on (see the module docstring for ``equivalent``)."""
    if not equivalent:
        return ratio
    r = (ratio * num_layers - layer) / (num_layers - layer)
    if r <= 0:
        raise ValueError(
            f"`ratio`={ratio} with equivalent=True needs ratio > layer/num_layers = {layer}/{num_layers}: "
            "the first K layers alone already exceed the budget (lower `layer` or use equivalent=False)"
        )
    return min(r, 1.0)


# -------------------------------------------------------------------------------------------- state


@dataclass
class _Call:
    """What the hooks know about the current language-model call."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cache: Any = None
    scores: torch.Tensor | None = None  # (B, S) from layer K-1, prefill only
    replace: dict[str, Any] = field(default_factory=dict)  # kwargs for layers >= K
    keep_index: torch.Tensor | None = None  # (B, L') kept positions (+ masked fillers), ascending
    keep_valid: torch.Tensor | None = None  # (B, L') False on fillers
    full_hidden: torch.Tensor | None = None  # layer K input (B, S, D), for the scatter back


@dataclass
class _Prefill:
    """What decode steps need from the pruned prefill."""

    cache: Any  # weakref to the cache object
    prompt_len: int  # S, the unpruned prompt length
    pruned_len: int  # L', the pruned prompt length held by layers >= K
    prompt_mask: torch.Tensor | None  # (B, L') 2D mask of the pruned prompt; None = all visible


class FastVState(threading.local):
    """FastV's per-forward state, one instance per thread (several threads may run one patched model).

    Attributes:
        call: the current language-model call (set by the LM's pre-hook, read by the layer hooks).
        pending_ids: ``input_ids`` of the current outer call, until the LM's pre-hook takes them.
        prefill: the last pruned prefill of this thread, for its decode steps.
        layouts: token layouts of the images of this thread's last encode (batch order).
        vision_plans: GlobalCom²'s plans of those images (GlobalCom² + FastV only).
        last_scores: ``(B, S)`` layer K-1 scores of this thread's last pruned prefill.
    """

    def __init__(self) -> None:
        self.call = _Call()
        self.pending_ids: torch.Tensor | None = None
        self.prefill: _Prefill | None = None
        self.layouts: list[ImageTokenLayout] | None = None
        self.vision_plans: list[Plan] | None = None
        self.last_scores: torch.Tensor | None = None


_CACHE_KEYS = ("cache", "past_key_values")

Select = Callable[
    [torch.Tensor, torch.Tensor, list[ImageTokenLayout] | None], tuple[torch.Tensor, list[Plan] | None]
]


def _cache_of(kwargs: dict) -> Any:
    for key in _CACHE_KEYS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


# -------------------------------------------------------------------------------------------- the pruner


class FastVPruner:
    """FastV pruning hooks on the language model of a LLaVA-NeXT model (see the module docstring).

    Args:
        model: ``LlavaNextForConditionalGeneration``.
        layer: K, the first pruned layer (1 <= K < num_layers).
        select: ``(scores (B,S), image_mask (B,S), layouts) -> (keep (B,S), plans)`` deciding which positions
            survive (FastV: top share per sample; GlobalCom² + FastV: GlobalCom²'s counts per region).
        layouts_from_sizes: image sizes -> token layouts, for calls with precomputed image features.
    """

    def __init__(self, model: Any, layer: int, select: Select,
                 layouts_from_sizes: Callable[[Any], list[ImageTokenLayout]]) -> None:  # fmt: skip
        self.model = model
        self.lm = model.model.language_model
        self.layers = self.lm.layers
        num_layers = len(self.layers)
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"`layer` must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}"
            )
        self.k = int(layer)
        attn = getattr(self.layers[self.k - 1], "self_attn", None)
        missing = [a for a in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attn, a)]
        if missing:
            raise TypeError(
                f"FastV needs Llama-style decoder layers (self_attn with {', '.join(missing)}); "
                f"{type(self.lm).__name__} layer {self.k - 1} has none"
            )
        self.select = select
        self.layouts_from_sizes = layouts_from_sizes
        self.image_token_id = int(model.config.image_token_id)
        self.state = FastVState()
        self.handle: GlobalComHandle | None = None
        from transformers.masking_utils import create_causal_mask

        self._create_mask = create_causal_mask
        self._warned: set[str] = set()

    @property
    def last_scores(self) -> torch.Tensor | None:
        """``(B, S)`` layer K-1 scores of the calling thread's last pruned prefill."""
        return self.state.last_scores

    # -- installation --------------------------------------------------------------------------------------
    def install(self, handle: GlobalComHandle) -> None:
        self.handle = handle
        inner = self.model.model
        handle.add_hook(inner.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        handle.add_hook(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        attn = self.layers[self.k - 1].self_attn
        handle.add_hook(attn.register_forward_pre_hook(self._score_pre, with_kwargs=True))
        handle.add_hook(self.layers[self.k].register_forward_pre_hook(self._prune_pre, with_kwargs=True))
        for layer in self.layers[self.k + 1 :]:
            handle.add_hook(layer.register_forward_pre_hook(self._follow_pre, with_kwargs=True))
        handle.add_hook(self.layers[-1].register_forward_hook(self._scatter_back))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- per-call context ----------------------------------------------------------------------------------
    def record_images(self, layouts: list[ImageTokenLayout], vision_plans: list[Plan] | None = None) -> None:
        """Token layouts (and GlobalCom²'s plans) of the images this thread just encoded."""
        self.state.layouts, self.state.vision_plans = layouts, vision_plans

    def _outer_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = self.state
        ids = kwargs.get("input_ids", args[0] if args else None)
        state.pending_ids = ids if isinstance(ids, torch.Tensor) else None
        if kwargs.get("pixel_values") is None and isinstance(kwargs.get("image_sizes"), torch.Tensor):
            # precomputed image features (mm_encoder_outputs): the sizes come with the call, not the packing
            self.record_images(self.layouts_from_sizes(kwargs["image_sizes"]))

    def _lm_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = self.state
        embeds = kwargs.get("inputs_embeds")
        ids, state.pending_ids = state.pending_ids, None
        if ids is not None and embeds is not None and ids.shape != embeds.shape[:2]:
            ids = None
        state.call = _Call(
            input_ids=ids, attention_mask=kwargs.get("attention_mask"), cache=_cache_of(kwargs)
        )
        if ids is None and embeds is not None and state.prefill is None:
            self._warn_once(
                "embeds", "FastV: the model was called with inputs_embeds only; image positions are unknown, "
                "nothing is pruned (call it with input_ids)",
            )  # fmt: skip

    def _image_mask(self) -> torch.Tensor | None:
        ids = self.state.call.input_ids
        if ids is None:
            return None
        mask = ids == self.image_token_id
        return mask if bool(mask.any()) else None

    # -- layer K-1: the scores -----------------------------------------------------------------------------
    @torch.no_grad()
    def _score_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = self._image_mask()
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if mask is None or hidden is None or hidden.shape[1] != mask.shape[1]:
            return
        call = self.state.call
        if call.cache is not None and call.cache.get_seq_length(self.k) > 0:
            self._warn_once("cache", "FastV: prompt with images on a non-empty cache; nothing is pruned")
            return
        attn2d = call.attention_mask
        if attn2d is not None and attn2d.dim() != 2:
            attn2d = None
        call.scores = self.state.last_scores = last_token_attention(
            module, hidden, kwargs["position_embeddings"], attn2d
        )

    # -- layer K: prune (prefill) or re-mask (decode) ------------------------------------------------------
    def _mask(self, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any) -> Any:
        # position_ids are not passed: kept positions jump, which the mask code would read as packed sequences.
        return self._create_mask(self.lm.config, hidden, mask2d, cache, None, layer_idx=self.k)

    @torch.no_grad()
    def _prune_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        call = state.call
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return None
        if call.scores is not None:
            return self._prune(hidden, args, kwargs)
        pre = state.prefill
        cache = _cache_of(kwargs)
        if pre is None or cache is None or pre.cache() is not cache:
            return None
        # decode step: mask = pruned prompt + every token after it
        q = hidden.shape[1]
        cache_len = cache.get_seq_length(self.k)
        b = hidden.shape[0]
        attn2d = (
            call.attention_mask
            if call.attention_mask is not None and call.attention_mask.dim() == 2
            else None
        )
        lp = pre.pruned_len
        if attn2d is None and pre.prompt_mask is None:
            mask2d = None
        else:
            prompt = pre.prompt_mask
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
                    f"FastV: the cache of layer {self.k} holds {cache_len} tokens but the attention mask implies "
                    f"{mask2d.shape[1] - q}; was the cache reordered (beam search is not supported)?"
                )
        call.replace = {"attention_mask": self._mask(hidden, mask2d, cache)}
        kwargs.update(call.replace)
        return args, kwargs

    def _prune(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = self.state
        call = state.call
        assert call.scores is not None and call.input_ids is not None
        b, s, d = hidden.shape
        dev = hidden.device
        image_mask = call.input_ids.to(dev) == self.image_token_id
        keep, plans = self.select(call.scores.to(dev), image_mask, self._layouts(image_mask))
        if plans is not None and self.handle is not None:
            self.handle.publish(plans)
        lp = int(keep.sum(1).max())
        pos = torch.arange(s, device=dev)
        # compaction, not a ranking: kept positions first (in order), then fillers; take L' and restore order
        first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :lp]
        keep_index = torch.sort(first, dim=1).values  # distinct positions
        keep_valid = keep.gather(1, keep_index)
        attn2d = (
            call.attention_mask
            if call.attention_mask is not None and call.attention_mask.dim() == 2
            else None
        )
        mask2d: torch.Tensor | None = (
            keep_valid if attn2d is None else keep_valid & attn2d.to(dev, torch.bool).gather(1, keep_index)
        )
        if attn2d is None and bool(keep_valid.all()):
            mask2d = None
        hidden_p = hidden.gather(1, keep_index[..., None].expand(-1, -1, d))
        cos, sin = kwargs["position_embeddings"]
        gather3 = keep_index[..., None].expand(-1, -1, cos.shape[-1])
        pos_emb = (cos.expand(b, -1, -1).gather(1, gather3), sin.expand(b, -1, -1).gather(1, gather3))
        position_ids = kwargs.get("position_ids")
        position_ids = (
            (pos[None] if position_ids is None else position_ids).expand(b, -1).gather(1, keep_index)
        )
        cache = _cache_of(kwargs)
        call.replace = {
            "attention_mask": self._mask(hidden_p, mask2d, cache),
            "position_embeddings": pos_emb,
            "position_ids": position_ids,
        }
        call.keep_index, call.keep_valid, call.full_hidden = keep_index, keep_valid, hidden
        call.scores = None
        state.prefill = (
            _Prefill(weakref.ref(cache), prompt_len=s, pruned_len=lp, prompt_mask=mask2d)
            if cache is not None
            else None
        )
        kwargs.update(call.replace)
        if args:
            args = (hidden_p, *args[1:])
        else:
            kwargs["hidden_states"] = hidden_p
        return args, kwargs

    def _follow_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        replace = self.state.call.replace
        if not replace:
            return None
        kwargs.update(replace)
        return args, kwargs

    def _scatter_back(self, module: Any, args: tuple, output: Any) -> Any:
        call = self.state.call
        if call.keep_index is None or call.full_hidden is None or call.keep_valid is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        full = call.full_hidden
        idx = call.keep_index[..., None].expand(-1, -1, full.shape[-1])
        out = torch.where(call.keep_valid[..., None], out, full.gather(1, idx))
        full = full.scatter(1, idx, out.to(full.dtype))
        call.keep_index = call.full_hidden = call.keep_valid = None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # -- images ----------------------------------------------------------------------------------------------
    def _layouts(self, image_mask: torch.Tensor) -> list[ImageTokenLayout] | None:
        """Token layouts of the images of this call, in batch order (None when they do not fit the call)."""
        layouts = self.state.layouts
        if layouts is None or sum(lay.num_tokens for lay in layouts) != int(image_mask.sum()):
            self._warn_once(
                "layout", "FastV: the images seen by the vision tower do not account for the image tokens of "
                "this call; per-image plans are not recorded",
            )  # fmt: skip
            return None
        return layouts


def _image_ids(
    image_mask: torch.Tensor, layouts: list[ImageTokenLayout]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index and region of every position, -1 off images; images fill placeholders in row-major order."""
    dev = image_mask.device
    image_of = torch.full(image_mask.shape, -1, dtype=torch.long, device=dev)
    region = torch.full(image_mask.shape, -2, dtype=torch.long, device=dev)
    lens = torch.tensor([lay.num_tokens for lay in layouts], device=dev)
    image_of[image_mask] = torch.repeat_interleave(torch.arange(len(layouts), device=dev), lens)
    region[image_mask] = torch.cat([lay.region for lay in layouts]).to(dev)
    return image_of, region


def _plans_from_keep(
    keep: torch.Tensor,
    image_mask: torch.Tensor,
    layouts: list[ImageTokenLayout] | None,
    ratios: list[torch.Tensor] | None = None,
) -> list[Plan] | None:
    if layouts is None:
        return None
    flat = keep[image_mask]
    plans, start = [], 0
    for i, lay in enumerate(layouts):  # one step per image
        plans.append(
            plan_from_keep(
                lay, flat[start : start + lay.num_tokens], ratios[i] if ratios else None, mode="fastv"
            )
        )
        start += lay.num_tokens
    return plans


# -------------------------------------------------------------------------------------------- the adapters


class FastVAdapter(LlavaNextAdapter):
    """FastV on LLaVA-NeXT: int(r * n_b) image tokens of sample b survive from layer K on.

    The diff from :class:`~globalcom2.adapters.llava_next.LlavaNextAdapter`: no vision-side scoring and no
    processor patch (the LLM receives every token, so the plain processor's prompts fit); the packing hands HF's
    packed rows on unchanged and records each image's token layout for :class:`FastVPruner`, whose hooks prune
    inside the LLM. After a forward, ``handle.plans`` hold the tokens that reached layers K..L-1.
    """

    def __init__(self, model: Any, processor: Any, config: Any, *, layer: int = 2,
                 equivalent: bool = False) -> None:  # fmt: skip
        super().__init__(model, processor, config)
        self.pruner = FastVPruner(model, layer, self.select, self.layouts_from_sizes)
        num_layers = len(self.pruner.layers)
        self.layer_ratio = layer_ratio(config.ratio, self.pruner.k, num_layers, equivalent)

    # -- checks and installation ---------------------------------------------------------------------------
    def check(self) -> None:
        if self.processor is None:  # the LLM receives every token: the processor is not patched
            self.check_model()
        else:
            super().check()

    def install_scoring(self, handle: GlobalComHandle) -> None:
        """FastV scores inside the LLM: no vision-side scoring hook."""

    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        """The LLM receives every token: the processor keeps HF's count."""

    def install_family(self, handle: GlobalComHandle) -> None:
        super().install_family(handle)
        self.pruner.install(handle)

    def num_image_tokens(self, height: int, width: int) -> int:
        return self.geometry((height, width)).num_tokens(None)

    # -- the vision side: every token goes on, the layouts are recorded -------------------------------------
    def select_packed(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                      arguments: dict[str, Any]) -> tuple[list[Plan], list[torch.Tensor]]:  # fmt: skip
        layouts = self.image_layouts(packed, arguments)
        self.pruner.record_images(layouts, self.vision_plans(handle, packed, arguments))
        everything = [plan_from_keep(lay, torch.ones(lay.num_tokens, dtype=torch.bool), mode="fastv")
                      for lay in layouts]  # fmt: skip
        return everything, list(packed)

    def vision_plans(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                     arguments: dict[str, Any]) -> list[Plan] | None:  # fmt: skip
        """Vision-side plans the LLM-side selection needs (none for FastV alone)."""
        return None

    def image_layouts(self, packed: list[torch.Tensor], arguments: dict[str, Any]) -> list[ImageTokenLayout]:
        newline = arguments.get("image_newline") is not None
        options = self.geometry_options(arguments)
        sizes = image_sizes_list(arguments["image_sizes"])
        layouts = []
        for feats, seq, size in zip(arguments["image_features"], packed, sizes, strict=True):
            if int(feats.shape[0]) == 1:
                lay = single_tile_layout(self.g, newline)
            else:
                lay = image_token_layout(self.geometry(size, **options), newline)
            if lay.num_tokens != int(seq.shape[0]):
                raise RuntimeError(
                    f"FastV: HF packed {seq.shape[0]} tokens for an image of {size[0]}x{size[1]}, the geometry "
                    f"gives {lay.num_tokens}; this transformers version packs differently"
                )
            layouts.append(lay)
        return layouts

    def layouts_from_sizes(self, image_sizes: Any) -> list[ImageTokenLayout]:
        """Layouts of tiled images from their sizes alone (calls with precomputed image features)."""
        return [image_token_layout(self.geometry(size)) for size in image_sizes_list(image_sizes)]

    # -- the LLM side: FastV's selection at layer K ----------------------------------------------------------
    def select(
        self, scores: torch.Tensor, image_mask: torch.Tensor, layouts: list[ImageTokenLayout] | None
    ) -> tuple[torch.Tensor, list[Plan] | None]:
        b = image_mask.shape[0]
        groups = torch.where(image_mask, torch.arange(b, device=image_mask.device)[:, None], -1)
        counts = (image_mask.sum(1).double() * self.layer_ratio).floor().long()
        keep = group_topk_keep(scores, groups, counts)
        return keep, _plans_from_keep(keep, image_mask, layouts)


class GlobalComFastVAdapter(FastVAdapter):
    """GlobalCom² + FastV (paper Fig. 8): GlobalCom²'s per-crop budgets, FastV's choice of tokens inside each.

    The vision side is GlobalCom²'s own: the shared scoring hook ([CLS] scores of Eq. 1) and
    :meth:`~globalcom2.adapters.anyres.AnyresAdapter.select_packed` give the budget-mode plan (r_j of Eq. 2-4,
    int(N*R) thumbnail tokens, k_j per crop), while the LLM receives every token. The one step swapped is the
    selection inside each region (Eq. 6): at layer K each region keeps its count of tokens by FastV's scores.
    """

    def install_scoring(self, handle: GlobalComHandle) -> None:
        super(FastVAdapter, self).install_scoring(handle)  # GlobalCom²'s hook, which FastV alone leaves out

    def vision_plans(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                     arguments: dict[str, Any]) -> list[Plan] | None:  # fmt: skip
        return super(FastVAdapter, self).select_packed(handle, packed, arguments)[0]

    def select(
        self, scores: torch.Tensor, image_mask: torch.Tensor, layouts: list[ImageTokenLayout] | None
    ) -> tuple[torch.Tensor, list[Plan] | None]:
        vision = self.pruner.state.vision_plans
        if layouts is None or vision is None or len(layouts) != len(vision):
            raise RuntimeError(
                "GlobalCom² + FastV: the images of this call were not scored by the vision tower "
                "(call the model with pixel_values and input_ids)"
            )
        image_of, region = _image_ids(image_mask, layouts)
        # one group per (image, region); newlines and text are always kept
        regions_per_image = torch.tensor([1 + lay.num_crops for lay in layouts], device=scores.device)
        offset = torch.cumsum(regions_per_image, 0) - regions_per_image
        selectable = (image_of >= 0) & (region != NEWLINE)
        groups = torch.where(selectable, offset[image_of.clamp_min(0)] + region.clamp_min(0), -1)
        counts = torch.cat([
            torch.cat([p.thumbnail_mask.sum().reshape(1), p.crop_keep_counts.reshape(-1)]).to(scores.device)
            for p in vision
        ])  # fmt: skip
        keep = group_topk_keep(scores, groups, counts)
        return keep, _plans_from_keep(keep, image_mask, layouts, [p.crop_ratios for p in vision])


__all__ = [
    "FastVAdapter",
    "FastVPruner",
    "FastVState",
    "GlobalComFastVAdapter",
    "group_topk_keep",
    "last_token_attention",
    "layer_ratio",
]
