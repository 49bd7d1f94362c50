"""PruMerge and PruMerge+ (Shang et al., "LLaVA-PruMerge", ICCV 2025), per tile, on the families with a [CLS] tower.

The rule (paper Sec. 3.2-3.3 and Algorithm 1, with the defaults of the authors' public code):

1. **[CLS] attention** (Sec. 3.2, Eq. 2): a = softmax(q_cls K^T / sqrt(d)) of the vision tower's last layer, computed
   from that layer's input -- the penultimate-layer features LLaVA reads -- with the layer's own pre-norm and
   query/key projections. ``attention="full"`` (default) is the public code's form: one attention over the whole
   width (d = hidden size, all heads together); ``attention="heads"`` is the layer's real multi-head attention,
   softmax per head then the mean over heads (FasterVLM's score). The softmax runs over every key ([CLS] included);
   a keeps the patch columns.
2. **Adaptive selection by outliers** (Sec. 3.2, AITS): the tokens with a_i > Q3 + 1.5 * IQR (interquartile range of
   the tile's a, quartiles by linear interpolation as ``numpy.percentile``) are kept. Their number is adaptive: it
   is *not* set by R. A tile without outliers keeps its top token (ties by :mod:`globalcom2.core.ranking`).
3. **PruMerge+** adds spatially uniform samples: with m outliers among N tokens, step s = max(1, floor(N / m) // 3)
   and the tokens at raster positions 0, s, 2s, ... below N - 1 (the public code's ``arange(0, 575, s)`` for
   N = 576) are kept too (so about 4 m tokens).
4. **Merge** (Sec. 3.3, TS, Algorithm 1 lines 4-8): every kept token y_p takes its k nearest tokens among all
   *other* tokens of the tile (kept or pruned) by cosine similarity of the last layer's keys (k = 32, ties: the
   earlier token wins) and becomes y'_p = y_p + sum_q a_q y_q (the public code's unnormalised weighted sum).
   With ``extra_token=True`` (public code) each tile also hands on one more token, sum over its pruned tokens of
   a_j y_j (a tile that pruned nothing hands on none: the public code would add a zero vector).

Applied per tile on LLaVA-NeXT (:class:`AnyresPruMerge`): the thumbnail and every crop separately, each crop on its
valid (unpadded) tokens only, which then play the role of the tile (N = the crop's valid tokens, raster positions in
its valid-token list). The merge acts on the projector's input (CLIP space, as in the public code); the merged tokens
are projected by the model's own projector. An image LLaVA-NeXT encodes as a single tile is not compressed (as by
every method there).

**InternVL** (:class:`TilePruMerge`): InternViT has a [CLS] token, but the LLM receives pixel-shuffled tokens, each
made of a 2 x 2 group of patches. The rule runs on that grid, every tile (each crop, the thumbnail, or the lone tile
of a one-tile image) a full g x g block without padding: a token's attention is the **sum** of its group's [CLS]
attention (the share of the [CLS] row its patches hold, as GlobalCom²'s scores on InternVL; step 1 over all
patches first), the IQR rule and the PruMerge+ samples run on those g*g sums (steps 2-3), and the merge compares
tokens by the cosine of their groups' four keys side by side (:func:`shuffle_keys`) and adds the projector's
inputs (the pixel-shuffled features; step 4). The LLM reads tile after tile in InternVL's order (crops row-major,
then the thumbnail), each tile's kept tokens in raster order followed by its remainder token.

**Llama 4** (:class:`Llama4PruMerge`): its vision encoder appends the class embedding **last** in each tile's
sequence and rotates q and k by a 2-D RoPE (the [CLS] position unrotated); the family's taps
(:class:`~globalcom2.adapters.llama4.ClsLastRotaryTap`) rotate the last layer's q and k as the layer does and move
the [CLS] first, so step 1 is the [CLS] row of the layer's own (rotated) q and k, and step 4 compares tokens by
those rotated keys. Then InternVL's rule per tile: the attention summed over each 2 x 2 pixel-shuffle group (as
Eq. 1's scores on Llama 4), the groups' keys side by side, every tile (each crop, the global tile last, or the lone
tile) a full g x g block. The tokens y merged are the pixel-shuffled patch features ``vision_adapter``'s MLP
receives; the merged rows go through that MLP, and the model's own projector maps them into the LLM. The tile
separators stay: each tile's run (between its markers) holds its kept tokens in raster order, then its remainder
token.

**Families without a [CLS]** (SigLIP / SigLIP2: OneVision, Idefics3, SmolVLM, Gemma 3, Aya Vision, Cohere2
Vision; the Qwen-VL ViT) have no attention to rank by: :func:`prumerge_rule` gives the reason and ``apply_method`` raises a TypeError
before anything is patched.

**Counts and R.** PruMerge's count depends on the image's attention, not on R: ``ratio`` is recorded on the handle
but not used (``METHODS["prumerge"].uses_ratio`` is False); the plans report what was kept. The count is only known
after the vision tower has run, so the processor stays unpatched and ``forward``/``generate`` run as in reference
mode: the call encodes the images first and resizes each image's placeholder run to its plan's count
(:meth:`~globalcom2.adapters.family.FamilyAdapter._reference_call`).

**Token order** handed to the LLM (LLaVA-NeXT): the thumbnail's kept tokens in raster order (then its extra token),
the kept crop tokens in raster order of the unpadded crop grid with one ``image_newline`` after every row (as HF
packs), then the crops' extra tokens in crop order.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.anyres import AnyresGeometry, footprint, packed_positions
from ..adapters.base import GlobalComHandle
from ..adapters.errors import UnsupportedModelError
from ..adapters.internvl import merge_pool
from ..adapters.llava_next import LlavaNextAdapter
from ..adapters.towers import Tap, TowerInfo
from ..core.layout import grid_to_tiles, tiles_to_grid
from ..core.plan import Plan
from ..core.ranking import descending_rank
from .vision import image_sizes_list

#: Options of ``prumerge`` / ``prumerge+`` and their defaults (the public code's).
PRUMERGE_OPTIONS: dict[str, Any] = {"k": 32, "attention": "full", "extra_token": True}
ATTENTIONS = ("full", "heads")

__all__ = [
    "ATTENTIONS",
    "PRUMERGE_OPTIONS",
    "PruMergeAdapter",
    "Llama4PruMerge",
    "PruMergePlan",
    "iqr_outliers",
    "merge_tokens",
    "plan_prumerge",
    "plan_prumerge_tiles",
    "prumerge_attention",
    "prumerge_class",
    "prumerge_rule",
    "shuffle_keys",
    "spatial_samples",
    "tile_valid_mask",
]


def check_options(k: Any, attention: Any, extra_token: Any) -> tuple[int, str, bool]:
    """Validate PruMerge's options (TypeError for a wrong type, ValueError for a wrong value)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"`k` must be an int, got {type(k).__name__} {k!r}")
    if int(k) < 1:
        raise ValueError(f"`k` (neighbours merged into each kept token) must be >= 1, got {k}")
    if attention not in ATTENTIONS:
        raise ValueError(
            f"`attention` must be one of {', '.join(repr(a) for a in ATTENTIONS)}; got {attention!r}"
        )
    if not isinstance(extra_token, bool):
        raise TypeError(f"`extra_token` must be a bool, got {type(extra_token).__name__} {extra_token!r}")
    return int(k), str(attention), extra_token


# -------------------------------------------------------------------------------------------- the rule


@torch.no_grad()
def prumerge_attention(
    hidden: torch.Tensor, tower: TowerInfo, attention: str = "full"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention over the patches and the patches' keys of the tower's last layer (step 1).

    Args:
        hidden: ``(T, P + N, D)`` input of the last layer (P prefix tokens, [CLS] first; Llama 4: [CLS] last, its
            taps rotate q and k as the layer does and move the [CLS] first).
        tower: the tower's scoring pieces (norm, q/k projections, heads, prefix tokens).
        attention: ``"full"`` (one attention over the whole width, scale D^-1/2) or ``"heads"`` (per-head softmax,
            mean over heads).

    Returns:
        ``(scores, keys)``: float32 ``(T, N)`` attention probabilities of the patch keys and ``(T, N, D)`` keys.
    """
    x = tower.norm(hidden)
    if tower.q_out is not None and tower.k_out is not None and type(tower.q_out).take is not Tap.take:
        # taps that transform the projections (Llama 4's ClsLastRotaryTap): q and k as the layer attends with them
        q = tower.q_out.take(tower.q_proj(x))[:, :1].float()
        k = tower.k_out.take(tower.k_proj(x)).float()
    else:
        q = tower.q_proj(x[:, :1]).float()  # (T, 1, D): the [CLS] query only
        k = tower.k_proj(x).float()  # (T, P + N, D)
    t, s, d = k.shape
    if attention == "full":
        probs = ((q @ k.transpose(-1, -2)).squeeze(1) * d**-0.5).softmax(-1)
    elif attention == "heads":
        h = tower.num_heads
        qh = q.view(t, 1, h, d // h).transpose(1, 2)  # (T, H, 1, dh)
        kh = k.view(t, s, h, d // h).transpose(1, 2)  # (T, H, S, dh)
        probs = ((qh @ kh.transpose(-1, -2)).squeeze(2) * (d // h) ** -0.5).softmax(-1).mean(1)
    else:
        raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {attention!r}")
    p = tower.num_prefix_tokens
    return probs[:, p:], k[:, p:]


def iqr_outliers(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool ``(T, N)``: the tokens with a > Q3 + 1.5 * IQR among each tile's valid tokens (step 2).

    Quartiles by linear interpolation over the valid tokens (``numpy.percentile``'s default), in float64. A tile
    with valid tokens but no outlier keeps its top token (the tie rule picks among equal scores).
    """
    out = _iqr_rule(scores, valid)
    top = descending_rank(scores.double().masked_fill(~valid, float("-inf"))) == 0
    return out | (top & valid & ~out.any(-1, keepdim=True))


def _iqr_rule(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The IQR rule alone (no fallback): a > Q3 + 1.5 * IQR among each tile's valid tokens."""
    x = scores.double().masked_fill(~valid, float("nan"))
    q1 = torch.nanquantile(x, 0.25, dim=-1, keepdim=True)
    q3 = torch.nanquantile(x, 0.75, dim=-1, keepdim=True)
    return (x > q3 + 1.5 * (q3 - q1)) & valid  # NaN compares False


def spatial_samples(outliers: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool ``(T, N)``: PruMerge+'s spatially uniform samples (step 3), on each tile's valid-token list."""
    n = valid.sum(-1, keepdim=True)
    m = outliers.sum(-1, keepdim=True).clamp_min(1)
    step = ((n // m) // 3).clamp_min(1)
    pos = valid.long().cumsum(-1) - 1  # index in the tile's valid-token list
    return valid & (pos % step == 0) & (pos < n - 1)


def merge_tokens(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: every kept token plus its k key-nearest tokens weighted by their attention; the pruned remainder.

    Args:
        features: ``(T, N, C)`` tokens y (the projector's input).
        keys: ``(T, N, D)`` keys of the last layer.
        scores: ``(T, N)`` [CLS] attention a.
        keep: Bool ``(T, N)`` kept tokens; valid: Bool ``(T, N)`` the tile's tokens (padding excluded).
        k: neighbours per kept token (fewer when the tile has fewer other tokens).

    Returns:
        ``(merged, extra)``: ``(keep.sum(), C)`` the kept tokens y'_p = y_p + sum_{q in kNN(p)} a_q y_q in
        ``keep.nonzero()`` order (tile by tile, raster order), and ``(T, C)`` the sum over each tile's pruned valid
        tokens of a_j y_j. Both in ``features``' dtype. Only the kept rows of the similarity matrix are formed
        (``(T, M, N)`` with M the largest kept count of a tile), not all N x N.
    """
    t, n, _ = keys.shape
    counts = keep.sum(-1)
    m = int(counts.max()) if t else 0
    rows = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[
        :, :m
    ]  # kept, ascending
    slot = torch.arange(m, device=keep.device)[None, :] < counts[:, None]  # (T, M): a real kept token
    unit = F.normalize(keys.float(), dim=-1)
    pick = unit.gather(1, rows[..., None].expand(-1, -1, unit.shape[-1]))  # (T, M, D)
    others = valid[:, None, :] & (rows[..., None] != torch.arange(n, device=keys.device))  # (T, M, N)
    sim = (pick @ unit.transpose(-1, -2)).masked_fill(~others, float("-inf"))
    neighbours = (descending_rank(sim) < k) & others  # stable sort: the earlier token wins a tie
    a = scores.float()
    y = features.float()
    weights = neighbours.float() * a[:, None, :]  # (T, M, N): a_q where q is a neighbour of p
    merged = y.gather(1, rows[..., None].expand(-1, -1, y.shape[-1])) + weights @ y
    extra = ((valid & ~keep).float() * a)[:, None, :] @ y  # (T, 1, C)
    return merged[slot].to(features.dtype), extra[:, 0].to(features.dtype)


# -------------------------------------------------------------------------------------------- one image


def tile_valid_mask(geo: AnyresGeometry, device: Any = None) -> torch.Tensor:
    """Bool ``(1 + rows*cols, g*g)``: the thumbnail (all valid), then each crop's cells inside the valid box."""
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    grid = torch.zeros(rows * g, cols * g, dtype=torch.bool, device=device)
    grid[top:bottom, left:right] = True
    crops = grid_to_tiles(grid, rows, cols).reshape(rows * cols, g * g)
    return torch.cat([torch.ones(1, g * g, dtype=torch.bool, device=device), crops])


def _tile_positions(geo: AnyresGeometry, newline: bool, device: Any = None) -> torch.Tensor:
    """Long ``(1 + rows*cols, g*g)``: each tile token's row in HF's packed sequence (-1 on padding)."""
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    grid = torch.full((rows * g, cols * g), -1, dtype=torch.long, device=device)
    grid[top:bottom, left:right] = packed_positions(geo, newline, device)[:, : right - left]
    crops = grid_to_tiles(grid, rows, cols).reshape(rows * cols, g * g)
    return torch.cat([torch.arange(g * g, device=device)[None], crops])


@dataclass
class PruMergePlan(Plan):
    """`Plan` of PruMerge(+): the masks mark the kept tokens, each of which carries its merged neighbours.

    Attributes:
        outlier_counts: Long ``(1 + rows*cols,)``: tokens kept per tile by the outlier step (thumbnail first): the
            number of its IQR outliers, or 1 for a tile without any, which keeps its top token instead (that token
            is not an IQR outlier; ``fallback_tiles`` marks those tiles).
        fallback_tiles: Bool ``(1 + rows*cols,)``: the tiles without an IQR outlier, whose one counted "outlier"
            is their top token (:func:`iqr_outliers`).
        sample_counts: Long ``(1 + rows*cols,)``: tokens added by PruMerge+'s spatial sampling (0 for PruMerge).
        extra_tiles: Bool ``(1 + rows*cols,)``: the tiles that hand on a remainder token (``extra_token`` and at
            least one token pruned).
        extra_tokens: their number.
        neighbours: k of the merge.
    """

    outlier_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    fallback_tiles: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    sample_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    extra_tiles: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    extra_tokens: int = 0
    neighbours: int = 0

    def summary(self) -> dict:
        out = super().summary()
        out.update(
            outlier_counts=[int(c) for c in self.outlier_counts],
            fallback_tiles=[bool(t) for t in self.fallback_tiles],
            sample_counts=[int(c) for c in self.sample_counts],
            extra_tokens=self.extra_tokens,
            neighbours=self.neighbours,
        )
        return out


def prumerge_keep(scores: torch.Tensor, valid: torch.Tensor, plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, outliers)``: Bool ``(T, N)`` kept tokens (outliers, plus PruMerge+'s samples) and the outliers."""
    outliers = iqr_outliers(scores, valid)
    keep = outliers | spatial_samples(outliers, valid) if plus else outliers
    return keep, outliers


def plan_prumerge(
    tile_scores: torch.Tensor,
    geo: AnyresGeometry,
    *,
    plus: bool,
    newline: bool = True,
    extra_token: bool = True,
    k: int = 32,
) -> tuple[PruMergePlan, torch.Tensor, torch.Tensor]:
    """Which tokens PruMerge(+) keeps in one tiled LLaVA-NeXT image, and where they go (steps 2-3).

    Args:
        tile_scores: ``(1 + rows*cols, g*g)`` [CLS] attention per tile, thumbnail first (:func:`prumerge_attention`).
        geo: the image's geometry (crop tokens = the valid box: LLaVA-NeXT).
        plus: PruMerge+ (add the spatial samples).
        newline: whether HF appends ``image_newline`` after every crop row.
        extra_token: whether each tile hands on its pruned remainder as one more token.
        k: recorded in the plan.

    Returns:
        ``(plan, keep, valid)``: Bool ``(1 + rows*cols, g*g)`` kept and valid tile tokens.
    """
    if geo.resampled:
        raise ValueError("plan_prumerge: the crop tokens must be the valid box (LLaVA-NeXT geometry)")
    rows, cols = geo.grid
    g = geo.g
    device = tile_scores.device
    valid = tile_valid_mask(geo, device)
    keep, outliers = prumerge_keep(tile_scores, valid, plus)
    top, bottom, left, right = geo.box
    crop_grid = tiles_to_grid(keep[1:].reshape(rows * cols, g, g), rows, cols)
    kept_counts = keep[1:].sum(-1)
    valid_counts = valid[1:].sum(-1)
    height = bottom - top
    extra_tiles = (valid & ~keep).any(-1) & extra_token
    num_tokens = int(keep.sum()) + (height if newline else 0) + int(extra_tiles.sum())
    plan = PruMergePlan(
        grid=geo.grid,
        thumbnail_mask=keep[0].reshape(g, g),
        crops_mask=footprint(crop_grid[top:bottom, left:right], geo.box, (rows * g, cols * g)),
        crop_ratios=kept_counts.float() / valid_counts.clamp_min(1).float(),
        num_tokens=num_tokens,
        num_tokens_full=geo.num_tokens(None, newline),
        valid_box=geo.box,
        crop_keep_counts=kept_counts,
        crop_valid_counts=valid_counts,
        mode="prumerge+" if plus else "prumerge",
        thumbnail_order=keep[0].nonzero().reshape(-1),
        outlier_counts=outliers.sum(-1),
        fallback_tiles=valid.any(-1) & ~_iqr_rule(tile_scores, valid).any(-1),
        sample_counts=(keep & ~outliers).sum(-1),
        extra_tiles=extra_tiles,
        extra_tokens=int(extra_tiles.sum()),
        neighbours=k,
    )
    return plan, keep, valid


def emit_image(
    seq: torch.Tensor,
    projected: torch.Tensor,
    extra: torch.Tensor,
    plan: PruMergePlan,
    keep: torch.Tensor,
    geo: AnyresGeometry,
    newline: bool,
) -> torch.Tensor:
    """The token run of one image handed to the LLM (order in the module docstring).

    Args:
        seq: HF's packed sequence of the image (thumbnail, then the crop rows with their newlines).
        projected: ``(keep.sum(), C)`` projected merged tokens, in ``keep.nonzero()`` order (tile by tile).
        extra: ``(plan.extra_tokens, C)`` projected remainder tokens of the tiles in ``plan.extra_tiles``.
        plan: the image's plan; keep: Bool ``(1 + rows*cols, g*g)`` its kept tokens.
    """
    positions = _tile_positions(geo, newline, seq.device)
    merged_seq = seq.clone()
    merged_seq[positions[keep]] = projected.to(seq.dtype)
    g2 = geo.g**2
    thumb = merged_seq[:g2][keep[0]]
    row_keep = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    row_keep[positions[1:][keep[1:]]] = True
    crops = packed_positions(geo, newline, seq.device)
    width = geo.token_grid[1]
    crops_keep = torch.cat(
        [row_keep[crops[:, :width]], row_keep.new_ones(crops.shape[0], int(newline))], dim=1
    )
    head = int(plan.extra_tiles[0])  # the thumbnail's remainder token comes right after its kept tokens
    extra = extra.to(seq.dtype)
    return torch.cat([thumb, extra[:head], merged_seq[crops[crops_keep]], extra[head:]])


# -------------------------------------------------------------------------------------------- InternVL's tiles


def shuffle_keys(keys: torch.Tensor, factor: int) -> torch.Tensor:
    """The keys of the LLM tokens of a pixel-shuffled tile: each token's ``factor x factor`` patch keys side by
    side (the cosine of step 4 then compares the groups' keys together).

    Args:
        keys: ``(T, P, D)`` patch keys in raster order of a ``p x p`` patch grid.

    Returns:
        ``(T, (p/factor)**2, factor*factor*D)`` in raster order of the merged grid.
    """
    t, pp, d = keys.shape
    p = int(round(pp**0.5))
    m = p // factor
    return keys.reshape(t, m, factor, m, factor, d).permute(0, 1, 3, 2, 4, 5).reshape(t, m * m, -1)


def plan_prumerge_tiles(
    tile_scores: torch.Tensor,
    grid: tuple[int, int],
    g: int,
    *,
    plus: bool,
    extra_token: bool = True,
    k: int = 32,
    thumbnail_first: bool = False,
) -> tuple[PruMergePlan, torch.Tensor]:
    """Which LLM tokens PruMerge(+) keeps in one image of InternVL's layout (every tile a full ``g x g`` grid of
    pixel-shuffled tokens; steps 2-3 on each tile).

    Args:
        tile_scores: ``(tiles, g*g)`` [CLS] attention of each LLM token (summed over its pixel-shuffle group), in
            the family's tile order: crops row-major, the thumbnail last (first if ``thumbnail_first``); one tile
            when the image is a lone tile (grid ``(1, 1)``).
        grid: ``(rows, cols)`` of crops.
        g: LLM tokens per tile side.
        plus, extra_token, k: as :func:`plan_prumerge`.

    Returns:
        ``(plan, keep)``: Bool ``(tiles, g*g)`` kept tokens, in the family's tile order. The plan's per-tile records
        (``outlier_counts``, ...) are thumbnail first, as on every family.
    """
    rows, cols = grid if grid[0] * grid[1] > 1 else (0, 0)  # a lone tile: no crops
    n = rows * cols
    valid = torch.ones_like(tile_scores, dtype=torch.bool)
    keep, outliers = prumerge_keep(tile_scores, valid, plus)
    thumb = 0 if thumbnail_first else n
    order = torch.tensor(
        [thumb] + [t for t in range(n + 1) if t != thumb], device=keep.device
    )  # thumbnail first
    crops = order[1:]
    extra_tiles = (valid & ~keep).any(-1) & extra_token
    kept_counts = keep[crops].sum(-1)
    plan = PruMergePlan(
        grid=(rows, cols),
        thumbnail_mask=keep[thumb].reshape(g, g),
        crops_mask=tiles_to_grid(keep[crops].reshape(n, g, g), rows, cols),
        crop_ratios=kept_counts.float() / (g * g),
        num_tokens=int(keep.sum()) + int(extra_tiles.sum()),
        num_tokens_full=(n + 1) * g * g,
        valid_box=(0, rows * g, 0, cols * g),
        crop_keep_counts=kept_counts,
        crop_valid_counts=torch.full((n,), g * g, dtype=torch.long, device=keep.device),
        mode="prumerge+" if plus else "prumerge",
        thumbnail_order=keep[thumb].nonzero().reshape(-1),
        outlier_counts=outliers.sum(-1)[order],
        fallback_tiles=~_iqr_rule(tile_scores, valid).any(-1)[order],
        sample_counts=(keep & ~outliers).sum(-1)[order],
        extra_tiles=extra_tiles[order],
        extra_tokens=int(extra_tiles.sum()),
        neighbours=k,
    )
    return plan, keep


def tile_token_order(keep: torch.Tensor, extra_tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the LLM's run of the kept tokens (``keep.nonzero()`` order) and of the remainder tokens (tiles
    in ``extra_tiles``): tile after tile, each tile's kept tokens in raster order, then its remainder token."""
    kept = keep.sum(-1)
    lengths = kept + extra_tiles.long()
    starts = torch.cumsum(lengths, 0) - lengths
    rank = torch.cumsum(keep.long(), -1) - 1
    return (starts[:, None] + rank)[keep], (starts + kept)[extra_tiles]


# -------------------------------------------------------------------------------------------- the adapters


class PruMergeMethod:
    """PruMerge / PruMerge+ in front of a family adapter with a [CLS] tower (:func:`prumerge_class`).

    What it swaps in the shared pipeline: its own last-layer hook (the [CLS] attention of step 1 and the keys), a
    pre-hook on the projector that records the tokens y, and each image's tokens (merged, projected tokens instead
    of a selection of the family's). The config runs in ``mode="reference"`` so that ``forward`` / ``generate``
    resize the placeholder runs to the adaptive counts. The family part (:class:`AnyresPruMerge`,
    :class:`TilePruMerge`) says where the tiles' tokens are and in which order the LLM reads them.
    """

    tower: TowerInfo
    inner: Any

    def merge_module(self) -> Any:
        """The module whose input holds the tokens y of step 4 and which maps the merged tokens to the image
        features the family hands on: the multimodal projector (LLaVA-NeXT, InternVL)."""
        return self.inner.multi_modal_projector

    def __init__(self, model: Any, processor: Any, config: Any, *, plus: bool, k: int = 32,
                 attention: str = "full", extra_token: bool = True) -> None:  # fmt: skip
        self.k, self.attention, self.extra_token = check_options(k, attention, extra_token)
        self.plus = bool(plus)
        self._handle: GlobalComHandle | None = None  # the one handle this adapter is installed on
        super().__init__(model, processor, config)  # type: ignore[call-arg]
        if not self.tower.has_cls:
            raise UnsupportedModelError(
                f"PruMerge ranks tokens by [CLS] attention; the {self.tower.name} vision tower has no [CLS] token"
            )

    # -- per-encode stash (this thread's ForwardState) ---------------------------------------------------------
    @staticmethod
    def _stash(handle: GlobalComHandle) -> dict[str, list[torch.Tensor]]:
        return handle.state.context.setdefault("prumerge", {"keys": [], "inputs": []})

    def pop_encode_inputs(self, kwargs: dict) -> dict:
        """A new encode starts: forget the keys and tokens of the previous one."""
        if self._handle is not None:
            self._stash(self._handle).update(keys=[], inputs=[])
        return super().pop_encode_inputs(kwargs)  # type: ignore[misc]

    def install_scoring(self, handle: GlobalComHandle) -> None:
        self._handle = handle
        t = self.tower
        hook = t.last_layer.register_forward_pre_hook(functools.partial(self._attention_hook, handle),
                                                      with_kwargs=True)  # fmt: skip
        handle.add_hook(hook)
        hook = self.merge_module().register_forward_pre_hook(functools.partial(self._projector_hook, handle))
        handle.add_hook(hook)

    @torch.no_grad()
    def _attention_hook(self, handle: GlobalComHandle, module: Any, args: tuple, kwargs: dict) -> None:
        state = handle.state
        if not state.capturing:
            return
        # the layer's input: positional, or by name (Llama 4's vision layers take ``hidden_state``)
        hidden = args[0] if args else kwargs["hidden_states" if "hidden_states" in kwargs else "hidden_state"]
        scores, keys = prumerge_attention(hidden, self.tower, self.attention)
        state.scores.append(scores)
        self._stash(handle)["keys"].append(keys)

    @torch.no_grad()
    def _projector_hook(self, handle: GlobalComHandle, module: Any, args: tuple) -> None:
        if handle.state.capturing:
            self._stash(handle)["inputs"].append(args[0])

    def take_encoded(
        self, handle: GlobalComHandle, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, inputs)`` of this encode's tiles (and clear the stash): the last layer's keys and the
        projector's input, one row per tile, checked against the scores' tiles."""
        stash = self._stash(handle)
        keys, inputs = torch.cat(stash["keys"]), torch.cat(stash["inputs"])
        stash.update(keys=[], inputs=[])
        if not keys.shape[0] == inputs.shape[0] == scores.shape[0]:
            raise RuntimeError(
                f"PruMerge: {scores.shape[0]} tiles were scored but the projector saw {inputs.shape[0]}"
            )
        return keys, inputs


class AnyresPruMerge(PruMergeMethod):
    """PruMerge(+) on LLaVA-NeXT's packed rows (:func:`plan_prumerge`, :func:`emit_image`)."""

    def select_packed(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                      arguments: dict[str, Any]) -> tuple[list[Plan], list[torch.Tensor]]:  # fmt: skip
        adapter: Any = self
        scores = adapter.take_scores(handle)
        keys, inputs = self.take_encoded(handle, scores)
        newline = arguments.get("image_newline") is not None
        projector = self.merge_module()
        plans: list[Plan] = []
        out, offset = [], 0
        for feats, seq, size in zip(arguments["image_features"], packed, image_sizes_list(arguments["image_sizes"]),
                                    strict=True):  # fmt: skip
            tiles = slice(offset, offset + int(feats.shape[0]))
            offset = tiles.stop
            if tiles.stop - tiles.start == 1:  # a single tile is not compressed (as by every method here)
                plan, index = adapter.plan_single_tile(newline, seq.device)
                out.append(seq[index])
                plans.append(plan)
                continue
            geo = adapter.geometry(size)
            s = scores[tiles].to(seq.device)
            plan, keep, valid = plan_prumerge(s, geo, plus=self.plus, newline=newline,
                                              extra_token=self.extra_token, k=self.k)  # fmt: skip
            if seq.shape[0] != plan.num_tokens_full:
                raise RuntimeError(
                    f"PruMerge: HF packed {seq.shape[0]} tokens for an image of {size[0]}x{size[1]}, the geometry "
                    f"gives {plan.num_tokens_full}; this transformers version packs differently"
                )
            y = inputs[tiles].to(seq.device)
            merged, extra = merge_tokens(y, keys[tiles].to(seq.device), s, keep, valid, self.k)
            rows = torch.cat([merged, extra[plan.extra_tiles]])
            proj = projector.forward(rows)  # .forward: not through the recording pre-hook
            n_kept = int(keep.sum())
            out.append(emit_image(seq, proj[:n_kept], proj[n_kept:], plan, keep, geo, newline))
            if out[-1].shape[0] != plan.num_tokens:
                raise RuntimeError("PruMerge: emitted tokens and plan disagree")  # guards the invariant
            plans.append(plan)
        if offset != scores.shape[0]:
            raise RuntimeError(f"PruMerge: {scores.shape[0]} tiles were scored but {offset} were packed")
        return plans, out


class TilePruMerge(PruMergeMethod):
    """PruMerge(+) on InternVL's tiles (module docstring, "InternVL"): the [CLS] attention summed over each
    pixel-shuffle group, the group's keys side by side, the merge on the projector's (pixel-shuffled) input."""

    factor: int
    g: int

    def _select(
        self, handle: GlobalComHandle, features: torch.Tensor, scores: torch.Tensor | None, grids: Any
    ) -> torch.Tensor:
        """Every image's merged, projected tokens: ``(num_tokens, 1, D)`` in the LLM's order."""
        adapter: Any = self
        assert scores is not None  # the attention hook ran
        grid_list, counts = adapter.tile_counts(features, grids)
        keys, inputs = self.take_encoded(handle, scores)
        device = features.device
        scores = merge_pool(scores, self.factor).to(device)  # Eq. 2's attention per LLM token
        keys = shuffle_keys(keys, self.factor).to(device)
        projector = self.merge_module()
        first = bool(getattr(self, "thumbnail_first", False))
        plans: list[Plan] = []
        out = []
        for s, y, key, grid in zip(scores.split(counts), inputs.to(device).split(counts), keys.split(counts),
                                   grid_list, strict=True):  # fmt: skip
            plan, keep = plan_prumerge_tiles(s, grid, self.g, plus=self.plus, extra_token=self.extra_token,
                                             k=self.k, thumbnail_first=first)  # fmt: skip
            valid = torch.ones_like(keep)
            merged, extra = merge_tokens(y, key, s, keep, valid, self.k)
            extra_tiles = (valid & ~keep).any(-1) & self.extra_token
            proj = projector.forward(
                torch.cat([merged, extra[extra_tiles]])
            )  # not through the recording hook
            at_kept, at_extra = tile_token_order(keep, extra_tiles)
            run = proj.new_empty(plan.num_tokens, proj.shape[-1])
            run[at_kept], run[at_extra] = proj[: merged.shape[0]], proj[merged.shape[0] :]
            out.append(run)
            plans.append(plan)
        handle.publish(plans)
        return torch.cat(out).unsqueeze(1)


class Llama4PruMerge(TilePruMerge):
    """PruMerge(+) on Llama 4's tiles (module docstring, "Llama 4"): InternVL's rule with the class embedding last,
    the merge on the pixel-shuffled patch features ``vision_adapter``'s MLP receives, and one run per tile."""

    vision_tower_name: str

    def merge_module(self) -> Any:
        """``vision_adapter.mlp``: its input is the pixel-shuffled patch features (one row per LLM token), its output
        the image features the model's own projector maps into the LLM (after the encode)."""
        return getattr(self.inner, self.vision_tower_name).vision_adapter.mlp

    def placeholder_run_counts(self, plans: list[Any]) -> list[int]:
        """Every tile's run: its kept tokens and its remainder token (markers stand between the tiles' runs)."""
        adapter: Any = self
        runs = super().placeholder_run_counts(plans)  # type: ignore[misc]  # the family's: kept tokens per tile
        extra = [adapter.in_run_order(p.extra_tiles[1:].long(), p.extra_tiles[:1].long()) for p in plans]
        counts = torch.cat(extra).tolist() if extra else []
        return [int(r) + int(e) for r, e in zip(runs, counts, strict=True)]


@functools.cache
def prumerge_class(family: type) -> type:
    """PruMerge(+)'s adapter class on ``family`` (one class per family, made once); TypeError for a family without
    a rule (a tower without [CLS], or a token layout PruMerge is not written for)."""
    reason = prumerge_rule(family)
    if reason is not None:
        raise TypeError(reason)
    from ..adapters.internvl import InternVLAdapter

    mixin: type = AnyresPruMerge
    if (
        getattr(family, "family", None) == "llama4"
    ):  # by registry name: adapters.llama4 imports the overlay code,
        mixin = Llama4PruMerge  # which imports this module (no import cycle)
    elif issubclass(family, InternVLAdapter):
        mixin = TilePruMerge
    return type(f"PruMerge{family.__name__}", (mixin, family), {})


#: the families whose vision tower has a [CLS] token PruMerge ranks by, and why the others have none
CLS_TOWERS = {"llava_next": None, "internvl": None, "llama4": None}
_NO_CLS = {
    "llava_onevision": "SigLIP", "idefics3": "SigLIP", "smolvlm": "SigLIP", "gemma3": "SigLIP",
    "aya_vision": "SigLIP2", "cohere2_vision": "SigLIP2", "qwen2_vl": "Qwen-VL", "qwen2_5_vl": "Qwen-VL", "qwen3_vl": "Qwen-VL",
    "qwen3_5": "Qwen-VL",
}  # fmt: skip


def prumerge_rule(family: type) -> str | None:
    """None where PruMerge(+) runs on ``family`` (an adapter class), else why not (one line)."""
    name = getattr(family, "family", family.__name__)
    if name in CLS_TOWERS:
        return None
    tower = _NO_CLS.get(name)
    if tower is not None:
        return f"PruMerge ranks tokens by [CLS] attention and the {tower} vision tower has no [CLS] token"
    return "PruMerge is not written for this family's token layout"


#: PruMerge(+) on LLaVA-NeXT.
PruMergeAdapter = prumerge_class(LlavaNextAdapter)
