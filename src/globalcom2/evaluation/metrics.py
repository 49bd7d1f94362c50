"""Fidelity metrics of a `Plan` that can be measured without an LLM (docs/eval.md defines each one).

They compare what a method keeps with reference maps from the *uncompressed* image seen by the vision tower
(the DINOv2 stand-in in ``globalcom2 eval``): the thumbnail's [CLS] attention (paper Eq. 1-2) mapped onto the crop
grid with the geometry of Eq. 5, each crop's own [CLS] attention, and the tower's patch features. They say how much
of what the encoder itself finds important survives; they are **not** accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.layout import grid_to_tiles, tiles_to_grid
from ..core.plan import Plan
from ..core.regions import native_selection_input, pooled_shape, region_grid
from ..core.resize import bilinear_resize

NAN = float("nan")


@dataclass
class Reference:
    """Reference maps of one image (all float32, computed once, shared by every method).

    Attributes:
        grid: ``(rows, cols)``.
        valid_box: unpadded area of the padded crop grid.
        thumb_attention: ``(g*g,)`` thumbnail [CLS] attention over its patches, summing to 1.
        mass: ``(rows*g, cols*g)`` thumbnail attention mapped onto the crop grid (bilinear, as Eq. 5's global
            sub-maps), zero on padding, summing to 1.
        crop_mass: ``(n,)`` M_j, the mass of each crop's valid block (sums to 1).
        weights: ``(rows*g, cols*g)`` token weights w = M_j * (crop j's own [CLS] attention renormalised over its
            valid tokens); zero on padding, summing to 1.
        features: ``(rows*g, cols*g, D)`` patch features of the crops at the LLM's feature layer, image layout.
        mean_feature: ``(D,)`` unweighted mean of the valid crop features (subtracted before cosines).
    """

    grid: tuple[int, int]
    valid_box: tuple[int, int, int, int]
    thumb_attention: torch.Tensor
    mass: torch.Tensor
    crop_mass: torch.Tensor
    weights: torch.Tensor
    features: torch.Tensor
    mean_feature: torch.Tensor


def build_reference(
    thumb_attention: torch.Tensor,
    crop_attention: torch.Tensor,
    crop_features: torch.Tensor,
    *,
    grid: tuple[int, int],
    valid_box: tuple[int, int, int, int],
) -> Reference:
    """Reference maps from the tower's uncompressed outputs.

    Args:
        thumb_attention: ``(g*g,)`` thumbnail [CLS] attention probabilities over the patches (any positive scale).
        crop_attention: ``(n, g*g)`` each crop's own [CLS] attention probabilities.
        crop_features: ``(n, g*g, D)`` crop patch features (the LLM's feature layer, before the projector).
        grid, valid_box: tiling geometry.
    """
    rows, cols = grid
    n, gg = crop_attention.shape
    g = int(round(gg**0.5))
    top, bottom, left, right = valid_box
    thumb = thumb_attention.float().reshape(-1)
    thumb = thumb / thumb.sum()
    valid = torch.zeros(rows * g, cols * g, dtype=torch.bool, device=thumb.device)
    valid[top:bottom, left:right] = True
    # The thumbnail map resized onto the valid box: the global sub-maps of Eq. 5, zero on padding.
    mass = torch.zeros(rows * g, cols * g, device=thumb.device)
    mass[top:bottom, left:right] = bilinear_resize(thumb.reshape(g, g), (bottom - top, right - left)).float()
    mass = mass.clamp_min(0)
    mass = mass / mass.sum()
    crop_mass = grid_to_tiles(mass, rows, cols).reshape(n, gg).sum(-1)
    valid_t = grid_to_tiles(valid, rows, cols).reshape(n, gg)
    local = crop_attention.float() * valid_t
    local = local / local.sum(-1, keepdim=True).clamp_min(1e-30)
    weights = tiles_to_grid((local * crop_mass[:, None]).reshape(n, g, g), rows, cols)
    d = crop_features.shape[-1]
    feats = tiles_to_grid(crop_features.float().reshape(n, g, g, d).movedim(-1, 0), rows, cols).movedim(0, -1)
    mean = feats[valid].mean(0)
    return Reference(grid, valid_box, thumb, mass, crop_mass, weights / weights.sum(), feats, mean)


def native_reference(features: torch.Tensor, grid: tuple[int, int], region_tokens: int) -> Reference:
    """Reference maps of one native-resolution image (Qwen-VL; docs/qwen.md), :func:`build_reference`'s rule on its
    geometry: the regions of at most G x G merged tokens are the crops and the pooled view is the thumbnail, each
    scored as the family scores them (Eq. 7 against the region's / the image's mean:
    :func:`~globalcom2.core.regions.native_selection_input`); the features are the merger's output.

    Args:
        features: ``(H*W, D)`` merged-token features in raster order (uncompressed).
        grid: ``(H, W)`` merged tokens.
        region_tokens: G.

    Returns:
        A `Reference` over the ``H x W`` grid (``grid`` = the regions' ``(rows, cols)``, no padding).
    """
    height, width = grid
    sel, layout = native_selection_input(features, grid, region_tokens, 1.0)
    n = layout.num_crops
    thumb = sel.thumbnail_scores.float().cpu()
    thumb = thumb / thumb.sum()
    mass = bilinear_resize(thumb.reshape(pooled_shape(height, width, region_tokens)), (height, width)).float()
    mass = mass.clamp_min(0)
    mass = (mass / mass.sum()).reshape(-1)
    region = layout.from_table(torch.arange(n)[:, None].expand(sel.crop_scores.shape).contiguous()).reshape(
        -1
    )
    crop_mass = torch.zeros(n).index_add_(0, region, mass)
    local = layout.from_table(sel.crop_scores.cpu()).float().reshape(-1)
    sums = torch.zeros(n).index_add_(
        0, region, local
    )  # Eq. 7 scores are negative: renormalise by the signed sum
    local = local / torch.where(sums == 0, 1.0, sums)[region]
    weights = local * crop_mass[region]
    feats = features.float().cpu()
    return Reference(
        region_grid(height, width, region_tokens), (0, height, 0, width), thumb, mass.reshape(height, width),
        crop_mass, (weights / weights.sum()).reshape(height, width), feats.reshape(height, width, -1), feats.mean(0),
    )  # fmt: skip


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def plan_metrics(plan: Plan, ref: Reference) -> dict[str, float]:
    """Fidelity metrics of one plan against its image's reference maps (see docs/eval.md).

    Returns:
        ``llm_share`` (image tokens handed to the LLM / uncompressed), ``thumb_mass``, ``crop_mass`` (NaN for
        pooling, which discards nothing), ``feat_cos`` (cosine of the attention-pooled crop feature, kept vs
        all), ``feat_cos_centred`` (the same after subtracting the image's mean token feature), ``share_cv`` (coefficient of variation of the
        per-crop kept share q_j = k_j / N_j), ``share_min`` / ``share_max`` (min / max q_j) and ``share_mass_corr``
        (Pearson correlation across crops between q_j and the crop's mass M_j; NaN when the shares are uniform,
        CV < 2 %).
    """
    pooled = hasattr(plan, "crops_cover")
    out: dict[str, float] = {"llm_share": plan.num_tokens / max(plan.num_tokens_full, 1)}
    w = ref.weights.reshape(-1)
    x = ref.features.reshape(w.numel(), -1)
    mu = ref.mean_feature
    f_all = w @ x
    if pooled:
        cover = plan.crops_cover.reshape(-1)  # type: ignore[attr-defined]
        sel = cover >= 0
        m = int(cover.max()) + 1
        bin_w = torch.zeros(m).index_add_(0, cover[sel], w[sel])
        bin_n = torch.zeros(m).index_add_(0, cover[sel], torch.ones_like(w[sel]))
        bin_x = torch.zeros(m, x.shape[1]).index_add_(0, cover[sel], x[sel]) / bin_n[:, None].clamp_min(1)
        f_kept = (bin_w @ bin_x) / bin_w.sum()
        out["thumb_mass"] = out["crop_mass"] = NAN
    else:
        keep = plan.crops_mask.reshape(-1).to(torch.bool)
        f_kept = (w * keep) @ x / (w * keep).sum().clamp_min(1e-30)
        thumb = plan.thumbnail_mask.reshape(-1)  # empty where the plan has no thumbnail (Qwen's pooling)
        same = thumb.numel() == ref.thumb_attention.numel()
        out["thumb_mass"] = float((ref.thumb_attention * thumb).sum()) if same else NAN
        out["crop_mass"] = float((ref.mass.reshape(-1) * keep).sum())
    out["feat_cos"] = _cos(f_all, f_kept)
    out["feat_cos_centred"] = _cos(f_all - mu, f_kept - mu)
    q = plan.crop_keep_counts.double() / plan.crop_valid_counts.double().clamp_min(1)
    q = q[plan.crop_valid_counts > 0]
    out["share_cv"] = float(q.std(unbiased=False) / q.mean()) if q.numel() and q.mean() > 0 else NAN
    out["share_min"] = float(q.min()) if q.numel() else NAN
    out["share_max"] = float(q.max()) if q.numel() else NAN
    # Uniform allocations differ only by integer rounding (CV < 2 %): a correlation would be noise. A plan of other
    # crops than the reference's (Qwen's pooling pools the whole grid as one) has nothing to correlate.
    uniform = math.isnan(out["share_cv"]) or out["share_cv"] < UNIFORM_CV
    if uniform or plan.crop_valid_counts.numel() != ref.crop_mass.numel():
        out["share_mass_corr"] = NAN
    else:
        out["share_mass_corr"] = _pearson(q, ref.crop_mass.double()[plan.crop_valid_counts > 0])
    return out


UNIFORM_CV = 0.02


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return NAN
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 1e-12 else NAN
