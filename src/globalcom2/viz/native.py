"""Kept-token overlay of a native-resolution plan (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5; docs/qwen.md).

Two panels of the image as the processor resized it: on the left the **virtual global view**, the image pooled to
the view's ``ph x pw`` cells (each cell drawn in the mean colour of its pixels: the features are pooled the same
way; the view hands no token to the LLM), on the right the merged-token grid with the **regions** (borders at the
band boundaries of :mod:`globalcom2.core.regions`), each labelled ``r_j`` and ``kept k_j/N_j``, and the discarded
tokens greyed (:func:`~globalcom2.viz.overlay.shade_discarded`). Composed like :func:`render_overlay`: pixels placed
1:1, text on a transparent axes, matplotlib's Agg canvas only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .overlay import TITLE_KEY, _canvas_to_pil, _new_figure, _place, _resize_rgb, _to_numpy, shade_discarded

if TYPE_CHECKING:
    from globalcom2.core.plan import Plan

_MARGIN, _GAP, _HEAD, _LINE = 16, 24, 30, 26
_BORDER = "#ffd21f"


def _bounds(n: int, parts: int) -> list[int]:
    """Band boundaries of :func:`globalcom2.core.regions.band_index` (``floor(i * n / parts)``)."""
    return [i * n // parts for i in range(parts + 1)]


def _pooled_pixels(pixels: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """The image averaged over the global view's cells (adaptive average pooling of the pixels)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None]
    pooled = F.adaptive_avg_pool2d(x, cells)
    up = F.interpolate(pooled, size=pixels.shape[:2], mode="nearest")
    return up[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def render_native_overlay(
    image: Image.Image,
    plan: Plan,
    *,
    token_px: int,
    title: str | None = None,
    out_path: str | Path | None = None,
    max_width: int = 1400,
) -> Image.Image:
    """Draw the virtual global view and the kept tokens of a native-resolution ``plan`` (module docstring).

    Args:
        image: the original photo.
        plan: the image's plan (``crops_mask`` = kept tokens on the ``H x W`` merged grid, ``grid`` = regions,
            ``thumbnail_mask`` shaped like the pooled view).
        token_px: pixels per merged token side (patch size x merge size: 28 or 32 for real checkpoints).
        title: first title line; out_path: also save the PNG there.
    """
    from matplotlib import patheffects

    keep = _to_numpy(plan.crops_mask).astype(bool)
    height, width = keep.shape
    rows, cols = plan.grid
    resized = np.asarray(
        image.convert("RGB").resize((width * token_px, height * token_px), Image.Resampling.BICUBIC)
    )
    cells = tuple(int(s) for s in plan.thumbnail_mask.shape)
    left_px = _pooled_pixels(resized, (cells[0], cells[1]))
    right_px = shade_discarded(resized, keep)
    scale = min(1.0, (max_width - 2 * _MARGIN - _GAP) / (2 * resized.shape[1]))
    left_img, right_img = _resize_rgb(left_px, scale), _resize_rgb(right_px, scale)
    pct = 100.0 * plan.num_tokens / max(plan.num_tokens_full, 1)
    token_line = (
        f"image tokens to the LLM: {plan.num_tokens} of {plan.num_tokens_full} ({pct:.1f} %), "
        f"{height}x{width} merged tokens, {rows}x{cols} regions"
    )
    head = _MARGIN + (2 if title else 1) * _LINE + 6
    fig_w = 2 * _MARGIN + left_img.shape[1] + _GAP + right_img.shape[1]
    fig_h = head + _HEAD + left_img.shape[0] + _MARGIN
    fig, canvas, ax = _new_figure(fig_w, fig_h)
    top, x_left = head + _HEAD, _MARGIN
    x_right = x_left + left_img.shape[1] + _GAP
    _place(fig, left_img, top, x_left, fig_h)
    _place(fig, right_img, top, x_right, fig_h)
    y = _MARGIN
    if title:
        ax.text(fig_w / 2, y, title, ha="center", va="top", fontsize=15, fontweight="bold")
        y += _LINE
    ax.text(fig_w / 2, y + 2, token_line, ha="center", va="top", fontsize=13)
    ax.text(
        x_left, top - 8, f"virtual global view: {cells[0]}x{cells[1]} pooled cells, no tokens", fontsize=12
    )
    ax.text(x_right, top - 8, f"regions {rows}x{cols}: kept tokens in colour", fontsize=12)
    stroke = [patheffects.withStroke(linewidth=4.5, foreground="black", alpha=0.55)]
    sy, sx = right_img.shape[0] / height, right_img.shape[1] / width
    row_b, col_b = _bounds(height, rows), _bounds(width, cols)
    for b in col_b[1:-1]:
        ax.plot(
            [x_right + b * sx] * 2,
            [top, top + right_img.shape[0]],
            color=_BORDER,
            lw=2.5,
            path_effects=stroke,
        )
    for b in row_b[1:-1]:
        ax.plot(
            [x_right, x_right + right_img.shape[1]],
            [top + b * sy] * 2,
            color=_BORDER,
            lw=2.5,
            path_effects=stroke,
        )
    ratios = _to_numpy(plan.crop_ratios).astype(float)
    kept_counts, valid_counts = _to_numpy(plan.crop_keep_counts), _to_numpy(plan.crop_valid_counts)
    for j in range(rows * cols):
        r, c = divmod(j, cols)
        ax.text(
            x_right + col_b[c] * sx + 6, top + row_b[r] * sy + 6,
            f"r_{j + 1} = {ratios[j]:.3f}\nkept {int(kept_counts[j])}/{int(valid_counts[j])}",
            ha="left", va="top", fontsize=11, color="white", linespacing=1.25,
            bbox={"boxstyle": "round,pad=0.3", "fc": "black", "ec": "none", "alpha": 0.62},
        )  # fmt: skip
    picture = _canvas_to_pil(canvas, fig_w, fig_h)
    if title:
        picture.info[TITLE_KEY] = title
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture


def native_token_px(model: Any) -> int:
    """Pixels per merged token side of a native-resolution model (patch size x spatial merge size)."""
    vcfg = model.config.vision_config
    return int(vcfg.patch_size) * int(vcfg.spatial_merge_size)
