"""FastV (Chen et al., ECCV 2024) and GlobalCom² + FastV (paper Sec. 5.3, Fig. 8) inside a Hugging Face LLM.

FastV prunes image tokens *inside* the LLM: layers 0..K-1 see every token; the head-mean attention that the last
prompt token pays to each image token in layer K-1 ranks them; layers K..L-1 see only the top share. As in the
official FastV code, the scores are layer K-1's softmax attention probabilities (its attention row of the last
token, averaged over heads) and kept tokens keep their original positions (RoPE).

Only layer K-1 needs attention weights, and only one row of them: a forward pre-hook on its attention module
recomputes ``q`` for the last prompt token and ``k`` for all tokens from that module's own projections and rotary
embedding (our [CLS]-row trick, :mod:`globalcom2.core.scores`, applied to the LLM), so every layer keeps SDPA /
Flash attention and nothing asks for ``output_attentions``.

FastV is the one-stage case of :class:`~globalcom2.methods.pruner.StagedPruner` (positions kept); what follows is
what that pruner does for it. Pruning is done with forward pre-hooks on the decoder layers (no copy of
``LlamaModel.forward``):

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
r = R (the default: FastV's own K/R reading), or with ``equivalent=True`` r = (R*L - K) / (L - K), which makes the
average image-token count over all L layers equal R (the "equivalent token count" of the paper's comparisons,
:func:`~globalcom2.methods.schedule.fastv_schedule`). GlobalCom² + FastV keeps exactly the
GlobalCom² budget-mode counts: int(N*R) thumbnail tokens and k_j tokens of crop j, split by the adaptive r_j of
Eq. 2-4 from the vision tower's [CLS] scores, with FastV's scores choosing *which* tokens inside each region;
newline tokens are always kept.

Both methods run on every family (:class:`FastVAdapter`, :class:`GlobalComFastVAdapter`, put in front of the family's
adapter by :func:`~globalcom2.methods.pruner.llm_method_class`) and are installed by the one
install path (:func:`globalcom2.adapters.base.install`): HF's packing runs unchanged and hands the LLM every token;
the adapter records each image's token layout (and, for GlobalCom² + FastV, GlobalCom²'s plan from the shared
scoring hook and :func:`~globalcom2.core.select.select_images`) for the pruner. Every per-forward value the hooks
pass on lives in a per-thread state, so several threads can run ``generate`` on one patched model; every top-k
ranks by :func:`~globalcom2.core.select.topk_mask` (ties: the earlier position wins).

Tested with Llama decoders under SDPA and eager attention, transformers 5.19 and 5.24; beam search (cache
reordering) is not supported.
"""

from __future__ import annotations

from typing import Any

import torch

from .pruner import (
    LLMPruningAdapter,
    PrunerState,
    Selection,
    StagedPruner,
    _Call,
    group_topk_keep,
    last_token_attention,
    num_llm_layers,
)
from .schedule import fastv_schedule, layer_ratio

FastVPruner = StagedPruner  # the one-stage pruner (kept name)
FastVState = PrunerState


class FastVAdapter(LLMPruningAdapter):
    """FastV on any family: int(r * n_b) image tokens of sample b survive from layer K on (module docstring).

    After a forward, ``handle.plans`` hold the tokens that reached layers K..L-1.
    """

    def __init__(self, model: Any, processor: Any, config: Any, *, layer: int = 2,
                 equivalent: bool = False) -> None:  # fmt: skip
        super().__init__(model, processor, config)
        num_layers = num_llm_layers(model)
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"`layer` must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}"
            )
        self.schedule = fastv_schedule(num_layers, config.ratio, layer=layer, equivalent=equivalent)
        self.layer_ratio = self.schedule.shares[0]
        self.build_pruner()


def region_groups(call: _Call, layouts_count: int, vision: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One group per (image, region) of the current entries (newlines, text, inserted tokens: -1), with the
    per-region counts of GlobalCom²'s plans ``vision`` (thumbnail first, then crops row-major)."""
    ent = call.entries
    layouts = call.layouts
    assert layouts is not None
    dev = ent["owner"].device
    regions_per_image = torch.tensor([1 + lay.num_crops for lay in layouts], device=dev)
    offset = torch.cumsum(regions_per_image, 0) - regions_per_image
    selectable = ent["valid"] & ent["image"] & (ent["owner"] >= 0) & (ent["region"] >= 0)
    groups = torch.where(selectable, offset[ent["owner"].clamp_min(0)] + ent["region"].clamp_min(0), -1)
    counts = torch.cat([
        torch.cat([p.thumbnail_mask.sum().reshape(1), p.crop_keep_counts.reshape(-1)]).to(dev) for p in vision
    ])  # fmt: skip
    return groups, counts


class GlobalComFastVAdapter(FastVAdapter):
    """GlobalCom² + FastV (paper Fig. 8): GlobalCom²'s per-crop budgets, FastV's choice of tokens inside each.

    The vision side is GlobalCom²'s own: the shared scoring hook ([CLS] scores of Eq. 1) and
    :meth:`~globalcom2.adapters.anyres.AnyresAdapter.select_packed` give the budget-mode plan (r_j of Eq. 2-4,
    int(N*R) thumbnail tokens, k_j per crop), while the LLM receives every token. The one step swapped is the
    selection inside each region (Eq. 6): at layer K each region keeps its count of tokens by FastV's scores.
    """

    display_name = "GlobalCom² + FastV"
    uses_vision_plans = True  # GlobalCom²'s scoring hook and plans, which FastV alone leaves out

    def checked_vision_plans(self, call: _Call) -> list:
        vision = self.pruner.state.vision_plans
        if call.layouts is None or vision is None or len(call.layouts) != len(vision):
            raise RuntimeError(
                f"{self.display_name}: the images of this call were not scored by the vision tower "
                "(call the model with pixel_values and input_ids)"
            )
        return vision

    def select(self, pruner: StagedPruner, stage: int, hidden: torch.Tensor, call: _Call) -> Selection:
        groups, counts = region_groups(call, len(call.layouts or []), self.checked_vision_plans(call))
        keep = group_topk_keep(call.scores[stage], groups, counts)
        # newlines are always kept; text is not an image entry
        return Selection(keep & call.entries["image"] & call.entries["valid"])


__all__ = [
    "FastVAdapter",
    "FastVPruner",
    "FastVState",
    "GlobalComFastVAdapter",
    "group_topk_keep",
    "last_token_attention",
    "layer_ratio",
    "region_groups",
]
