"""The GlobalCom² selection (paper Sec. 4.1-4.2, Eq. 2-6): one family-agnostic function for every model and mode.

Input is a tiled image already reduced to tensors: the thumbnail's token scores, each crop's own token scores as
rows of a table (:class:`~globalcom2.core.layout.CropLayout`), which table cells are valid tokens, the thumbnail
sub-map of every crop (Eq. 5) and which crop every thumbnail token lies over (Eq. 2). Output: which tokens are kept,
the per-crop ratios r_j and counts. Where the kept tokens go in the LLM's sequence is the family's business.

**Tie rule** (:mod:`globalcom2.core.ranking`). Among equal scores the token earlier in raster order wins: the
thumbnail's raster order, and inside a crop that crop's raster order (its row of the table). Every top-k here, and so
every family, mode, baseline and the vLLM plugin, ranks with that module's stable sort. The official code calls
``torch.topk``, whose order among exactly equal scores depends on the device and kernel; reference mode follows this
rule instead.

**Batches.** :func:`select_batch` runs the selection for all images of a forward at once: one set of tensor
operations over ``(images, crops, tokens)`` tables padded to the batch's largest image, whatever each image's grid,
valid box or R. Nothing in it reads the device (the counts come from the geometry), and an image gets the same
selection alone as in any batch (every sum, Eq. 2-5, is order-free: :mod:`globalcom2.core.sums`).
:func:`select_images` pads the per-image inputs into that batch; :func:`select_tokens` is the one-image call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .allocation import allocate_ratios
from .budget import budget_counts, split_budget
from .ranking import descending_rank
from .sums import exact_sum

SCORINGS = ("holistic", "local", "global")
MODES = ("budget", "reference")


def _wide(x: torch.Tensor) -> torch.Tensor:
    # float64 keeps distinct float32 scores distinct after normalisation (MPS has no float64).
    return x.float() if x.device.type == "mps" else x.double()


def _l2_normalise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, _wide(x), 0.0)
    # The norm's sum of squares is order-free (core.sums): the same normaliser alone, in a padded batch and on
    # every machine, so equal inputs give equal holistic scores everywhere.
    return x / exact_sum(x * x).sqrt().clamp_min(1e-12)


def holistic_scores(
    local: torch.Tensor, global_: torch.Tensor, valid: torch.Tensor, *, scoring: str, alpha: float
) -> torch.Tensor:
    """Token scores inside each crop (paper Eq. 5), each source L2-normalised over the crop's valid tokens.

    Args:
        local: ``(n, M)`` each crop's own scores s^L.
        global_: ``(n, M)`` the thumbnail's resized sub-map s^G for each crop.
        valid: Bool ``(n, M)``.
        scoring: ``"holistic"`` (alpha * s^G + (1 - alpha) * s^L), ``"local"`` or ``"global"`` (Table 3).
        alpha: weight of the global score.

    Returns:
        ``(n, M)`` float64 (float32 on MPS); ``-inf`` on invalid cells.
    """
    if scoring == "holistic":
        # both sources normalised in one pass (each row is normalised on its own: stacking changes no bit)
        g, l_ = _l2_normalise(torch.stack((_wide(global_), _wide(local))), valid).unbind(0)
        s = alpha * g + (1 - alpha) * l_
    elif scoring == "local":
        s = _l2_normalise(local, valid)
    elif scoring == "global":
        s = _l2_normalise(global_, valid)
    else:
        raise ValueError(f"`scoring` must be one of {SCORINGS}, got {scoring!r}")
    return s.masked_fill(~valid, float("-inf"))


@dataclass
class Selection:
    """Kept tokens of one tiled image (one image of :func:`select_images`).

    Attributes:
        thumbnail_keep: Bool ``(N,)`` in thumbnail raster order.
        thumbnail_order: Long ``(k0,)``: kept thumbnail tokens in emission order (raster order in budget mode,
            descending score in reference mode, as the official code).
        crop_keep: Bool ``(n, M)`` kept crop tokens, table layout.
        crop_ratios: ``(n,)`` r_j (Eq. 4).
        crop_keep_counts: Long ``(n,)`` kept tokens per crop.
        crop_valid_counts: Long ``(n,)`` valid tokens N_j per crop.
    """

    thumbnail_keep: torch.Tensor
    thumbnail_order: torch.Tensor
    crop_keep: torch.Tensor
    crop_ratios: torch.Tensor
    crop_keep_counts: torch.Tensor
    crop_valid_counts: torch.Tensor


@dataclass
class SelectionInput:
    """One tiled image reduced to tensors: the arguments of :func:`select_tokens` for one image.

    Attributes:
        thumbnail_scores: ``(N,)`` thumbnail token scores, raster order.
        crop_scores: ``(n, M)`` each crop's own token scores s^L (table layout; invalid cells are ignored).
        crop_valid: Bool ``(n, M)`` valid table cells.
        global_scores: ``(n, M)`` each crop's thumbnail sub-map (Eq. 5).
        region_map: Long ``(N,)`` crop index of every thumbnail token
            (:func:`~globalcom2.core.layout.thumbnail_region_map`).
        ratio: this image's R.
        num_crop_tokens: sum_j N_j when the caller knows it from the geometry (then nothing waits for the
            device); None: counted from ``crop_valid`` (one device read for the whole batch).
    """

    thumbnail_scores: torch.Tensor
    crop_scores: torch.Tensor
    crop_valid: torch.Tensor
    global_scores: torch.Tensor
    region_map: torch.Tensor
    ratio: float
    num_crop_tokens: int | None = None


@dataclass
class BatchSelection:
    """Kept tokens of a batch of images (the output of :func:`select_batch`), padded to the largest image.

    Attributes:
        thumbnail_keep: Bool ``(B, N)``.
        thumbnail_order: Long ``(B, N)``: every thumbnail index, the kept ones first in emission order.
        thumbnail_counts: k0 of every image (host ints).
        crop_keep: Bool ``(B, n, M)``; crop_ratios ``(B, n)``; crop_keep_counts, crop_valid_counts Long ``(B, n)``
            (0 on padded crops).
    """

    thumbnail_keep: torch.Tensor
    thumbnail_order: torch.Tensor
    thumbnail_counts: list[int]
    crop_keep: torch.Tensor
    crop_ratios: torch.Tensor
    crop_keep_counts: torch.Tensor
    crop_valid_counts: torch.Tensor

    def image(self, b: int, num_crops: int, width: int) -> Selection:
        """Image ``b`` of the batch, cut back to its ``num_crops`` x ``width`` crop table (views, no copies)."""
        n = num_crops
        return Selection(
            self.thumbnail_keep[b],
            self.thumbnail_order[b, : self.thumbnail_counts[b]],
            self.crop_keep[b, :n, :width],
            self.crop_ratios[b, :n],
            self.crop_keep_counts[b, :n],
            self.crop_valid_counts[b, :n],
        )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")


def select_batch(
    thumbnail_scores: torch.Tensor,
    crop_scores: torch.Tensor,
    crop_valid: torch.Tensor,
    global_scores: torch.Tensor,
    region_map: torch.Tensor,
    *,
    ratios: Sequence[float],
    num_crops: Sequence[int],
    num_crop_tokens: Sequence[int] | None = None,
    num_thumbnail_tokens: Sequence[int] | None = None,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
) -> BatchSelection:
    """GlobalCom² on a batch of tiled images (paper Eq. 2-6), in budget or reference mode, vectorised.

    1. Thumbnail: keep its top ``int(N * R_b)`` tokens (Eq. 1-2 scores).
    2. r_j from the thumbnail scores over each crop's region (Eq. 2-4, ``allocation`` = Table 2).
    3. Crop tokens scored by Eq. 5 (``scoring`` = Table 3) and the top k_j of crop j kept (Eq. 6), with
       k_j = int(N_j * r_j) (reference mode, the official counts) or K = int(R * sum N_j) split by r_j * N_j
       (budget mode, :func:`~globalcom2.core.budget.split_budget`).

    Args:
        thumbnail_scores: ``(B, N)`` thumbnail token scores, raster order.
        crop_scores: ``(B, n, M)`` each crop's own token scores s^L (table layout, padded; invalid cells ignored).
        crop_valid: Bool ``(B, n, M)`` valid table cells (False on padding).
        global_scores: ``(B, n, M)`` each crop's thumbnail sub-map (Eq. 5).
        region_map: Long ``(B, N)`` crop index of every thumbnail token (any value < n for an image without
            crops).
        ratios: R of every image (host floats).
        num_crops: real crops of every image (the rest of its ``n`` rows are padding; 0: thumbnail only).
        num_crop_tokens: sum_j N_j of every image, from the geometry; None: counted from ``crop_valid`` with one
            device read for the batch.
        num_thumbnail_tokens: N of every image when thumbnails differ in size (a native-resolution image's pooled
            global view, :mod:`globalcom2.core.regions`): the rest of its ``N`` columns is padding, never ranked
            nor counted in a region; None: every image has all ``N``.
        mode, allocation, scoring, alpha, tau: see :class:`globalcom2.GlobalComConfig`.

    Returns:
        A :class:`BatchSelection`; ties are broken by the tie rule (module docstring).
    """
    _check_mode(mode)
    thumb = thumbnail_scores.float()
    device = thumb.device
    batch, n_max = crop_scores.shape[0], crop_scores.shape[1]
    num_valid = crop_valid.sum(-1)
    if num_crop_tokens is None:
        num_crop_tokens = num_valid.sum(-1).tolist()  # the one device read, for the whole batch
    sizes = (
        [thumb.shape[-1]] * batch if num_thumbnail_tokens is None else [int(n) for n in num_thumbnail_tokens]
    )
    counts = [budget_counts(n, int(s), r) for n, s, r in zip(sizes, num_crop_tokens, ratios, strict=True)]
    k0 = [c[0] for c in counts]
    thumb_valid = None
    if any(n != thumb.shape[-1] for n in sizes):  # padded thumbnails: padding ranks last, lies in no region
        thumb_valid = torch.arange(thumb.shape[-1]) < torch.tensor(sizes, dtype=torch.long)[:, None]
        thumb_valid = thumb_valid.to(device)
    # The thumbnail's top int(N * R_b): one stable sort gives the reference order (descending score, earlier
    # index first) and the rank of every token.
    ranked = thumb if thumb_valid is None else thumb.masked_fill(~thumb_valid, float("-inf"))
    by_score = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(thumb.shape[-1], device=device).expand_as(by_score)
    rank = torch.empty_like(by_score).scatter_(-1, by_score, positions)
    thumbnail_keep = rank < torch.tensor(k0, dtype=torch.long, device=device)[:, None]
    # Budget mode emits the kept tokens in raster order: a stable sort puts them first, in index order.
    order = (
        by_score if mode == "reference" else torch.sort((~thumbnail_keep).byte(), dim=-1, stable=True).indices
    )
    if n_max == 0:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return BatchSelection(
            thumbnail_keep, order, k0, crop_valid.clone(), thumb.new_zeros(batch, 0), empty, empty
        )

    real_crops = torch.tensor(list(num_crops), dtype=torch.long, device=device)
    crop_mask = torch.arange(n_max, device=device) < real_crops[:, None]
    ratio = torch.tensor(list(ratios), dtype=torch.float64)  # host values; moved once
    if thumb_valid is None:
        r = allocate_ratios(
            thumb, region_map, n_max, ratio=ratio, allocation=allocation, tau=tau, crop_mask=crop_mask,
            thumbnail_keep=thumbnail_keep,
        )  # fmt: skip
    else:  # padding cells score 0 in an extra, masked crop n_max that no real crop sees
        r = allocate_ratios(
            thumb.masked_fill(~thumb_valid, 0.0), torch.where(thumb_valid, region_map, n_max), n_max + 1,
            ratio=ratio, allocation=allocation, tau=tau, crop_mask=F.pad(crop_mask, (0, 1), value=False),
            thumbnail_keep=thumbnail_keep,
        )[..., :n_max]  # fmt: skip
    s = holistic_scores(crop_scores, global_scores, crop_valid, scoring=scoring, alpha=alpha)
    if mode == "reference":
        # uniform keeps exactly int(N_j * R): a float32 copy of R loses a token where N_j * R is an integer.
        r_exact = ratio.to(device)[:, None].expand_as(r) if allocation == "uniform" else r.double()
        k = (num_valid.double() * r_exact).floor().long()  # padded crops: N_j = 0
    else:
        total = torch.tensor([c[1] for c in counts], dtype=torch.long, device=device)
        k = split_budget(total, r.double() * num_valid, num_valid)
    crop_keep = (descending_rank(s) < k[..., None]) & crop_valid  # Eq. 6 in every crop at once
    return BatchSelection(thumbnail_keep, order, k0, crop_keep, r, k, num_valid)


def select_images(
    images: Sequence[SelectionInput],
    *,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
) -> list[Selection]:
    """GlobalCom² on several images at once: their inputs padded into one batch and :func:`select_batch` run once.

    Images may differ in crop count, table width, R and thumbnail size N (padded, see :func:`select_batch`).
    Returns one :class:`Selection` per image, in order, equal to what that image gets alone.
    """
    _check_mode(mode)
    if not images:
        return []
    n_max = max(x.crop_scores.shape[0] for x in images)
    m_max = max(x.crop_scores.shape[1] for x in images)

    # Padding and stacking copy; a lone image (or one already of the batch's size) needs neither.
    def batched(parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)

    def stack(name: str, fill: float | bool) -> torch.Tensor:
        parts = []
        for x in images:
            t = getattr(x, name)
            t = t.reshape(-1, t.shape[-1]) if t.numel() else t.new_zeros(0, m_max)
            if t.shape != (n_max, m_max):
                t = F.pad(t, (0, m_max - t.shape[1], 0, n_max - t.shape[0]), value=fill)
            parts.append(t)
        return batched(parts)

    sizes = [x.thumbnail_scores.numel() for x in images]
    n_thumb = max(sizes)

    def pad_thumb(parts: list[torch.Tensor]) -> torch.Tensor:
        flat = [t.reshape(-1) for t in parts]
        return batched([F.pad(t, (0, n_thumb - t.numel())) if t.numel() < n_thumb else t for t in flat])

    device = images[0].thumbnail_scores.device
    known = [x.num_crop_tokens for x in images]
    wide = _wide(images[0].thumbnail_scores).dtype
    batch = select_batch(
        pad_thumb([x.thumbnail_scores.float() for x in images]),
        stack("crop_scores", 0.0).to(wide),
        stack("crop_valid", False),
        stack("global_scores", 0.0).to(wide),
        pad_thumb([x.region_map.to(device) for x in images]),
        ratios=[x.ratio for x in images],
        num_crops=[x.crop_scores.shape[0] for x in images],
        num_crop_tokens=None if any(v is None for v in known) else [int(v) for v in known],  # type: ignore[arg-type]
        num_thumbnail_tokens=sizes if any(n != n_thumb for n in sizes) else None,
        mode=mode, allocation=allocation, scoring=scoring, alpha=alpha, tau=tau,
    )  # fmt: skip
    out = [batch.image(b, x.crop_scores.shape[0], x.crop_scores.shape[1]) for b, x in enumerate(images)]
    for sel, n in zip(out, sizes, strict=True):
        sel.thumbnail_keep = sel.thumbnail_keep[:n]  # the image's own thumbnail (padding cut off)
    return out


def kept_crop_tokens(
    images: Sequence[SelectionInput], selections: Sequence[Selection], mode: str
) -> list[int]:
    """Crop tokens kept in each image, as host ints (to size each image's packed sequence).

    Budget mode: ``int(R * sum_j N_j)`` from the geometry (:func:`~globalcom2.core.budget.budget_counts`, no device
    read; every input must carry ``num_crop_tokens``). Reference mode: the data-dependent sums of
    ``int(N_j * r_j)``, read from the device once for the whole batch.
    """
    if mode == "budget" and all(x.num_crop_tokens is not None for x in images):
        return [
            budget_counts(x.thumbnail_scores.numel(), int(x.num_crop_tokens or 0), x.ratio)[1] for x in images
        ]
    if not selections:
        return []
    return [int(v) for v in torch.stack([s.crop_keep_counts.sum() for s in selections]).tolist()]


def select_tokens(
    thumbnail_scores: torch.Tensor,
    crop_scores: torch.Tensor,
    crop_valid: torch.Tensor,
    global_scores: torch.Tensor,
    region_map: torch.Tensor,
    *,
    ratio: float,
    mode: str = "budget",
    allocation: str = "softmax-sum",
    scoring: str = "holistic",
    alpha: float = 0.5,
    tau: float = 10.0,
    num_crop_tokens: int | None = None,
) -> Selection:
    """GlobalCom² on one tiled image (paper Eq. 2-6): :func:`select_batch` on a batch of one.

    Args:
        thumbnail_scores, crop_scores, crop_valid, global_scores, region_map, num_crop_tokens: one image's
            :class:`SelectionInput` fields. ``n = 0`` (no crops) selects the thumbnail only.
        ratio, mode, allocation, scoring, alpha, tau: see :class:`globalcom2.GlobalComConfig`.

    Returns:
        A :class:`Selection`; ties are broken by the tie rule (module docstring).
    """
    image = SelectionInput(
        thumbnail_scores, crop_scores, crop_valid, global_scores, region_map, ratio, num_crop_tokens
    )
    return select_images([image], mode=mode, allocation=allocation, scoring=scoring, alpha=alpha, tau=tau)[0]
