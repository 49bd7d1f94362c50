"""SparseVLM (Zhang et al., ICML 2025) and GlobalCom² + SparseVLM (paper Fig. 8) inside a Hugging Face LLM.

SparseVLM prunes image tokens in stages, rated by the prompt's text (its Sec. 3):

1. **Text raters** (Sec. 3.2, public code): from the LLM's input embeddings, the relevance of text token t is
   mean_v softmax_t(h_v . h_t) over the image tokens v (softmax over the text tokens after the image); the text
   tokens whose relevance is above the mean are the raters (if none is strictly above, every such text token
   rates; if the prompt has no text after its images, the last prompt token does).
2. **Rating** (Sec. 3.2): at each pruning layer l (public code: 2, 6, 15 of 32; scaled to other depths), the
   raters' rows of layer l's softmax attention, averaged over heads, restricted to the image tokens still
   present: P (raters x image tokens). A token's score is its mean over the raters. Only the raters' rows are
   computed (:func:`~globalcom2.methods.pruner.query_attention`: a few dozen rows, no S x S map), so every layer
   keeps SDPA; the paper's point that SparseVLM needs attention maps (GlobalCom² Table 4) holds for its public
   code, which materialises full maps, not for this implementation (``globalcom2 bench --table4`` measures it).
3. **How many** (Sec. 3.3): ``budget="schedule"`` (default) keeps the layer average of the image tokens at R
   (:func:`~globalcom2.methods.schedule.sparsevlm_schedule`, the paper's equal-token comparisons; the public code
   hand-sets per-stage counts for this); the deletions d are the fewest for which the kept plus recycled tokens
   fit the stage's count (none are recycled where even one would not fit). ``budget="rank"`` is the paper's
   adaptive rule: the number kept follows the rank of P, ``min(floor(scale * rank(P)), n - 1)`` (public code,
   ``scale`` = 13.5), and nothing is deleted when P has full rank; the layer average then depends on the image
   and prompt (``Plan.layer_tokens`` records it).
4. **Recycling** (Sec. 3.4): of the d deleted tokens, the ``int(recycle * d) + 1`` with the highest scores
   (``recycle`` = 0.3) are clustered into ``int(m / 10) + 1`` tokens by density-peak clustering with k nearest
   neighbours (k = the number of clusters; distances ||x - y|| / sqrt(D) between the pruning layer's outputs),
   each cluster averaged into one token; these go right after the sample's last kept image token. Ties in
   density and centre choice follow the tie rule (earlier token first) instead of the public code's random noise.

Positions are renumbered after each stage (``positions="compact"``, the public code's v1 behaviour); decode
tokens are shifted by the stage's total. Image tokens of a sample are rated together (newlines included, as
FastV here). GlobalCom² + SparseVLM keeps the newlines and gives every stage GlobalCom²'s per-region budgets at
the stage's share (:class:`GlobalComSparseVLMAdapter`). Every family
(:func:`~globalcom2.methods.pruner.llm_method_class`): only image tokens are rated and dropped, markers stay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..core.budget import budget_counts, split_budget
from ..core.ranking import descending_rank
from .pruner import (
    RECYCLED,
    LLMPruningAdapter,
    Selection,
    StagedPruner,
    _Call,
    group_topk_keep,
    num_llm_layers,
    pack_rows,
    query_attention,
)
from .schedule import sparsevlm_schedule

SPARSEVLM_OPTIONS = {"layers": None, "budget": "schedule", "scale": 13.5, "recycle": 0.3}
BUDGETS = ("schedule", "rank")


def select_raters(hidden: torch.Tensor, image: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (module docstring, step 1).

    Args:
        hidden: ``(B, S, D)`` input embeddings.
        image: Bool ``(B, S)`` image tokens.
        attn: Bool ``(B, S)`` real (non-padding) tokens.

    Returns:
        Bool ``(B, S)``: the raters.
    """
    b, s, _ = hidden.shape
    pos = torch.arange(s, device=hidden.device)
    last_image = torch.where(image, pos, -1).amax(dim=1)
    text = attn & ~image & (pos[None] > last_image[:, None])
    vi, vv = pack_rows(image)
    ti, tv = pack_rows(text)
    rows = torch.arange(b, device=hidden.device)[:, None]
    v, t = hidden[rows, vi].float(), hidden[rows, ti].float()
    rel = (v @ t.transpose(1, 2)).masked_fill(~tv[:, None, :], float("-inf")).softmax(dim=-1)  # (B, n, t)
    rel = torch.nan_to_num(rel) * vv[..., None]
    rel = rel.sum(1) / vv.sum(1, keepdim=True).clamp_min(1)  # (B, t)
    mean = (rel * tv).sum(1, keepdim=True) / tv.sum(1, keepdim=True).clamp_min(1)
    chosen = tv & (rel > mean)
    chosen = torch.where(chosen.any(1, keepdim=True), chosen, tv)  # none strictly above the mean: all rate
    raters = torch.zeros(b, s, dtype=torch.bool, device=hidden.device)
    raters.scatter_(1, ti, chosen)
    last = torch.where(attn, pos, -1).amax(dim=1).clamp_min(0)
    no_text = ~raters.any(1)
    raters[no_text, last[no_text]] = True
    return raters


def recycled_count(deleted: torch.Tensor, recycle: float) -> torch.Tensor:
    """Tokens recycled from ``deleted`` deleted ones: int(int(recycle * d + 1) / 10) + 1, or 0 (module docstring)."""
    d = deleted.double()
    m = (recycle * d).floor() + 1
    c = (m / 10).floor() + 1
    return torch.where((deleted > 0) & (recycle > 0), c, 0).long()


def dpc_knn_merge(
    x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours, each cluster averaged (SparseVLM Sec. 3.4).

    Args:
        x: ``(B, M, D)`` tokens to merge.
        valid: Bool ``(B, M)``.
        clusters: Long ``(B,)`` clusters per sample (<= its valid tokens; also the k of the kNN density).

    Returns:
        ``(merged (B, C, D), merged_valid (B, C))`` with C = max clusters.
    """
    b, m, d = x.shape
    width = int(clusters.max()) if clusters.numel() else 0
    if m == 0 or width == 0:
        return x.new_zeros(b, width, d), torch.zeros(b, width, dtype=torch.bool, device=x.device)
    xf = x.float()
    sq = (xf * xf).sum(-1)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * xf @ xf.transpose(1, 2)).clamp_min(0).sqrt() / math.sqrt(d)
    pair = valid[:, :, None] & valid[:, None, :]
    inf = torch.tensor(float("inf"), device=x.device)
    near = torch.sort(torch.where(pair, dist, inf), dim=-1, stable=True).values  # (B, M, M) ascending
    col = torch.arange(m, device=x.device)
    k = clusters.clamp_min(1)[:, None, None]
    in_k = col[None, None, :] < k
    density = (-(torch.where(in_k, near, 0.0) ** 2).sum(-1) / k[..., 0]).exp()  # (B, M)
    # j is "higher" than i: denser, or as dense and earlier (the tie rule instead of random noise)
    higher = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (col[None, None, :] < col[None, :, None])
    )
    higher = higher & pair
    dist_max = torch.where(pair, dist, 0.0).flatten(1).amax(1)[:, None]
    parent = torch.where(higher, dist, inf).amin(-1)
    parent = torch.where(higher.any(-1), parent, dist_max)
    score = torch.where(valid, parent * density, float("-inf"))
    is_center = (descending_rank(score) < clusters[:, None]) & valid
    centers, center_valid = pack_rows(is_center, width)
    to_center = torch.where(
        center_valid[:, None, :], dist.gather(2, centers[:, None, :].expand(-1, m, -1)), inf
    )
    assign = to_center.argmin(-1)  # first minimum: the earlier centre wins ties
    slot = torch.cumsum(is_center.long(), 1) - 1
    assign = torch.where(is_center, slot, assign)
    onehot = torch.nn.functional.one_hot(assign, centers.shape[1]).to(xf.dtype) * valid[..., None]
    merged = onehot.transpose(1, 2) @ xf / onehot.sum(1)[..., None].clamp_min(1)
    return merged.to(x.dtype), center_valid


class SparseVLMAdapter(LLMPruningAdapter):
    """SparseVLM on any family (module docstring).

    Args:
        model, processor, config: as every adapter (``config.ratio`` is R).
        layers: pruning layers l_s (layer l_s's attention rates; layers > l_s see the pruned set). Default: 2, 6,
            15 of 32 scaled to the LLM's depth.
        budget: ``"schedule"`` (layer average R) or ``"rank"`` (the paper's adaptive count).
        scale: kept tokens per unit of rank(P) with ``budget="rank"``.
        recycle: share of the deleted tokens that are recycled (0 disables recycling).
    """

    score_offset = 1
    plan_mode = "sparsevlm"
    positions = "compact"
    display_name = "SparseVLM"

    def __init__(self, model: Any, processor: Any, config: Any, *, layers: Sequence[int] | None = None,
                 budget: str = "schedule", scale: float = 13.5, recycle: float = 0.3) -> None:  # fmt: skip
        super().__init__(model, processor, config)
        if budget not in BUDGETS:
            raise ValueError(f"`budget` must be one of {BUDGETS}, got {budget!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"`scale` must be a number > 0, got {scale!r}")
        if isinstance(recycle, bool) or not isinstance(recycle, (int, float)) or not 0 <= recycle < 1:
            raise ValueError(f"`recycle` must be in [0, 1), got {recycle!r}")
        self.budget, self.scale, self.recycle = budget, float(scale), float(recycle)
        num_layers = num_llm_layers(model)
        self.schedule = sparsevlm_schedule(num_layers, config.ratio, layers=layers)
        self.build_pruner()

    # -- raters and scores -----------------------------------------------------------------------------------
    def prepare(self, pruner: StagedPruner, hidden: torch.Tensor, call: _Call) -> None:
        ent = call.entries
        ent["rater"] = select_raters(hidden, ent["image"], ent["attn"])

    def score(self, pruner: StagedPruner, stage: int, attn: Any, hidden: torch.Tensor, kwargs: dict,
              call: _Call) -> torch.Tensor:  # fmt: skip
        ent = call.entries
        q_index, q_valid = pack_rows(ent["rater"] & ent["valid"])
        rows = query_attention(attn, hidden, kwargs["position_embeddings"], q_index, pruner.key_mask(call))
        rows = rows * q_valid[..., None]
        call.extra[f"rater_rows_{stage}"] = rows
        return rows.sum(1) / q_valid.sum(1).clamp_min(1)[:, None]

    # -- how many, which, and what is recycled ----------------------------------------------------------------
    def deletions(self, pruner: StagedPruner, stage: int, call: _Call, cand: torch.Tensor,
                  target: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``(B,)`` image tokens to delete in this stage (module docstring, step 3)."""
        n = cand.sum(1)
        if self.budget == "rank":
            idx, ok = pack_rows(cand)
            rows = call.extra[f"rater_rows_{stage}"]
            p = rows.gather(2, idx[:, None, :].expand(-1, rows.shape[1], -1)) * ok[:, None, :]
            rank = torch.linalg.matrix_rank(p.double())
            kept = torch.minimum((self.scale * rank.double()).floor().long(), (n - 1).clamp_min(0))
            return torch.where(rank >= n, 0, n - kept)
        target = torch.minimum(pruner.stage_count(stage, call) if target is None else target, n)
        # fewest d with n - d + recycled(d) <= target (the total falls by 0 or 1 per extra deletion)
        d = torch.arange(int(n.max()) + 1, device=n.device)[None]
        fits = (n[:, None] - d + recycled_count(d, self.recycle) <= target[:, None]) & (d <= n[:, None])
        first = torch.where(fits, d, int(n.max()) + 1).amin(1)
        return torch.where(first <= n, first, n - target)  # nothing fits with recycling: plain deletions

    def recycle_tokens(self, hidden: torch.Tensor, scores: torch.Tensor, deleted: torch.Tensor,
                       num_deleted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Merge the best-rated deleted tokens into a few (module docstring, step 4)."""
        b = hidden.shape[0]
        m = torch.where(num_deleted > 0, (self.recycle * num_deleted.double()).floor().long() + 1, 0)
        m = torch.where(recycled_count(num_deleted, self.recycle) > 0, m, 0)
        groups = torch.where(deleted, torch.arange(b, device=hidden.device)[:, None], -1)
        picked = group_topk_keep(scores, groups, m) & deleted
        idx, ok = pack_rows(picked)
        x = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        return dpc_knn_merge(x, ok, recycled_count(num_deleted, self.recycle))

    def region_keep(self, pruner: StagedPruner, stage: int, call: _Call, cand: torch.Tensor,
                    num_keep: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Which candidates stay: the ``num_keep`` best per sample (SparseVLM alone)."""
        b = cand.shape[0]
        groups = torch.where(cand, torch.arange(b, device=cand.device)[:, None], -1)
        return group_topk_keep(call.scores[stage], groups, num_keep) & cand

    def select(self, pruner: StagedPruner, stage: int, hidden: torch.Tensor, call: _Call) -> Selection:
        ent = call.entries
        cand = ent["image"] & ent["valid"]
        num_del = self.deletions(pruner, stage, call, cand)
        keep = self.region_keep(pruner, stage, call, cand, cand.sum(1) - num_del)
        if self.recycle == 0:
            return Selection(keep)
        deleted = cand & ~keep
        num_del = deleted.sum(1)
        if self.budget == "schedule":  # where even one recycled token would exceed the stage's count: none
            room = keep.sum(1) + recycled_count(num_del, self.recycle) <= pruner.stage_count(stage, call)
            deleted = deleted & room[:, None]
            num_del = deleted.sum(1)
        extras, extras_valid = self.recycle_tokens(hidden, call.scores[stage], deleted, num_del)
        ar = torch.arange(cand.shape[1], device=cand.device)
        last_image = torch.where(cand, ar, -1).amax(1)
        staying = ent["valid"] & (keep | ~ent["image"])
        after = torch.where(staying & (ar[None] <= last_image[:, None]), ar, -1).amax(1).clamp_min(0)
        return Selection(keep, extras, extras_valid, after)


class GlobalComSparseVLMAdapter(SparseVLMAdapter):
    """GlobalCom² + SparseVLM (paper Fig. 8): GlobalCom²'s per-region budgets, SparseVLM's choice inside each.

    The vision side is GlobalCom²'s (the shared [CLS] scoring hook and the budget-mode plan at R: r_j of Eq. 2-4).
    At each SparseVLM stage with share rho_s, the thumbnail keeps int(N * rho_s) and the crops together
    int(rho_s * sum_j N_j) (GlobalCom²'s budget counts at rho_s), split over the crops in proportion to
    r_j * N_j (:func:`~globalcom2.core.budget.split_budget`); the raters' scores choose the tokens inside each
    region; newlines are always kept. Deleted tokens are recycled as in SparseVLM; recycled tokens come on top of
    the region budgets and go back to the recycling pool at the next stage. ``budget="schedule"`` only.
    """

    display_name = "GlobalCom² + SparseVLM"
    uses_vision_plans = True  # GlobalCom²'s scoring hook and plans

    def __init__(self, model: Any, processor: Any, config: Any, **options: Any) -> None:
        if options.get("budget", "schedule") != "schedule":
            raise ValueError("globalcom2+sparsevlm takes GlobalCom²'s budgets: `budget` must be 'schedule'")
        super().__init__(model, processor, config, **options)

    def stage_region_counts(self, share: float, vision: list) -> torch.Tensor:
        """Per image, thumbnail then crops: GlobalCom²'s budget counts at ``share``, split by r_j * N_j."""
        out = []
        for p in vision:  # one step per image
            valid = p.crop_valid_counts.long()
            thumb, crops = budget_counts(int(p.thumbnail_mask.numel()), int(valid.sum()), share)
            split = split_budget(crops, p.crop_ratios.double() * valid, valid) if valid.numel() else valid
            out.append(torch.cat([torch.tensor([thumb]), split]))
        return torch.cat(out)

    def select(self, pruner: StagedPruner, stage: int, hidden: torch.Tensor, call: _Call) -> Selection:
        vision = self.pruner.state.vision_plans
        layouts = call.layouts
        if layouts is None or vision is None or len(layouts) != len(vision):
            raise RuntimeError(
                f"{self.display_name}: the images of this call were not scored by the vision tower "
                "(call the model with pixel_values and input_ids)"
            )
        ent = call.entries
        dev = hidden.device
        b = hidden.shape[0]
        regions_per_image = torch.tensor([1 + lay.num_crops for lay in layouts], device=dev)
        offset = torch.cumsum(regions_per_image, 0) - regions_per_image
        num_regions = int(regions_per_image.sum())
        cand = ent["image"] & ent["valid"] & ((ent["region"] >= 0) | (ent["region"] == RECYCLED))
        # regions of the images; earlier stages' recycled tokens: one group per sample with budget 0
        groups = torch.where(ent["region"] >= 0, offset[ent["owner"].clamp_min(0)] + ent["region"].clamp_min(0),
                             num_regions + torch.arange(b, device=dev)[:, None])  # fmt: skip
        groups = torch.where(cand, groups, -1)
        counts = torch.cat([
            self.stage_region_counts(self.schedule.shares[stage], vision).to(dev),
            torch.zeros(b, dtype=torch.long, device=dev),
        ])  # fmt: skip
        keep = group_topk_keep(call.scores[stage], groups, counts) & cand
        fixed = ent["image"] & ~cand  # newlines: always kept
        if self.recycle == 0:
            return Selection(keep | fixed)
        deleted = cand & ~keep
        extras, extras_valid = self.recycle_tokens(hidden, call.scores[stage], deleted, deleted.sum(1))
        ar = torch.arange(cand.shape[1], device=dev)
        last_image = torch.where(ent["image"] & ent["valid"], ar, -1).amax(1)
        staying = ent["valid"] & (keep | ~cand)
        after = torch.where(staying & (ar[None] <= last_image[:, None]), ar, -1).amax(1).clamp_min(0)
        return Selection(keep | fixed, extras, extras_valid, after)


__all__ = [
    "SPARSEVLM_OPTIONS",
    "GlobalComSparseVLMAdapter",
    "SparseVLMAdapter",
    "dpc_knn_merge",
    "recycled_count",
    "select_raters",
]
