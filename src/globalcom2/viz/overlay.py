"""Kept-token overlays in the style of the paper's Figure 7.

A LLaVA-NeXT "anyres" image is shown the way the vision tower sees it: the thumbnail (the whole image squashed
to ``tile_size x tile_size``) next to the padded crop canvas (the image resized to fit the best resolution,
aspect ratio kept, centred). Kept tokens keep their original colours; discarded tokens are desaturated and
lightened, so the photo stays readable while the retained regions stand out. Crop borders are drawn every
``g`` patch cells and each crop is labelled with its retention ratio ``r_j`` and ``kept/N_j`` (pooling, which
averages instead of keeping: ``N_j → pooled tokens``). Every number and word on a panel comes from
:func:`globalcom2.viz.numbers.panel_text`, the numbers from :func:`~globalcom2.viz.numbers.panel_numbers`, which
the JSON summaries use too.

Padding is **not shown**: the crop panel is cut to the unpadded area ``Plan.valid_box`` (in patch cells, times
the patch pixel size), i.e. exactly the cells the model keeps after ``unpad_image``.

Images are composed in pixel space with numpy/PIL and placed at 1:1 scale with ``Figure.figimage`` (no
resampling by matplotlib); text and lines go on a transparent overlay axes in pixel coordinates. matplotlib is
imported lazily (Agg canvas, no pyplot), so ``globalcom2.core`` never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .numbers import _valid_box, panel_numbers, panel_text

if TYPE_CHECKING:
    from globalcom2.core.plan import Plan

__all__ = ["TITLE_KEY", "padded_canvas", "render_grid", "render_overlay", "shade_discarded"]

_DPI = 100
_MAX_WIDTH = 1400
_MAX_HEIGHT = 1200
_MARGIN = 16
_GAP = 24
_HEADER = 30
_TITLE_LINE = 26
_BORDER_COLOR = "#ffd21f"
#: Key of ``Image.info`` under which :func:`render_overlay` records its picture's title.
TITLE_KEY = "globalcom2_title"


# --------------------------------------------------------------------------------------------- pixel helpers


def padded_canvas(
    image: Image.Image,
    best_resolution: tuple[int, int],
    *,
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Rebuild LLaVA-NeXT's padded crop canvas for ``image``.

    Mirrors ``LlavaNextImageProcessorPil._resize_for_patching`` / ``_pad_for_patching``: the image is resized
    to ``get_patch_output_size`` (the limiting side fills the target, the other is ``ceil``-ed and clamped),
    then zero-padded symmetrically (``divmod(diff, 2)``; the odd pixel goes to the bottom / right).

    Args:
        image: source photo (any mode; converted to RGB as the processor does).
        best_resolution: ``(height, width)`` of the canvas, as returned by ``select_best_resolution``.
        resample: PIL resampling filter (LLaVA-NeXT uses bicubic).

    Returns:
        ``(canvas, box)``: the ``(H, W, 3)`` uint8 canvas and the pixel box ``(top, bottom, left, right)``
        occupied by the resized photo.
    """
    target_h, target_w = int(best_resolution[0]), int(best_resolution[1])
    src = image.convert("RGB")
    orig_w, orig_h = src.size
    scale_w = target_w / orig_w
    scale_h = target_h / orig_h
    if scale_w < scale_h:
        new_w = target_w
        new_h = min(math.ceil(orig_h * scale_w), target_h)
    else:
        new_h = target_h
        new_w = min(math.ceil(orig_w * scale_h), target_w)
    resized = np.asarray(src.resize((new_w, new_h), resample=resample))
    top = (target_h - new_h) // 2
    left = (target_w - new_w) // 2
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, (top, top + new_h, left, left + new_w)


def _cell_index(n_pixels: int, n_cells: int) -> np.ndarray:
    """Patch-cell index of every pixel along one axis (``n_pixels`` pixels cover ``n_cells`` cells)."""
    return (np.arange(n_pixels) * n_cells) // n_pixels


def shade_discarded(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey out the pixels of discarded patch cells; kept cells are returned unchanged.

    Discarded cells are desaturated (luma only) and lightened towards white so that the content stays
    visible but clearly recedes.

    Args:
        pixels: ``(H, W, 3)`` uint8 image covering the whole cell grid.
        mask: Bool ``(h_cells, w_cells)``; True = kept. Pixel ``(y, x)`` belongs to cell
            ``(y * h_cells // H, x * w_cells // W)``.

    Returns:
        New ``(H, W, 3)`` uint8 array.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = pixels.shape[:2]
    if mask.size == 0:
        return pixels.copy()
    keep = mask[_cell_index(height, mask.shape[0])][:, _cell_index(width, mask.shape[1])]
    rgb = pixels.astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.clip(118.0 + 0.52 * luma, 0, 255).astype(np.uint8)
    return np.where(keep[..., None], pixels, grey[..., None])


def _to_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def _resize_rgb(pixels: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return pixels
    h, w = pixels.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, resample=Image.Resampling.LANCZOS))


# --------------------------------------------------------------------------------------------- figure layout


@dataclass
class _Layout:
    """Pixel layout of an overlay figure (boxes are ``(top, left, height, width)`` in output pixels)."""

    width: int
    height: int
    scale: float
    thumb_box: tuple[int, int, int, int]
    crops_box: tuple[int, int, int, int] | None
    crop_origin: tuple[int, int] = (0, 0)  # (top, left) of valid_box in canvas pixels, before scaling


def _new_figure(width: int, height: int) -> tuple[Any, Any, Any]:
    """Agg figure of exactly ``width x height`` pixels plus a transparent overlay axes in pixel units."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A quarter-pixel slack keeps int() truncation in the renderer from losing a pixel to float error.
    fig = Figure(figsize=((width + 0.25) / _DPI, (height + 0.25) / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, (width + 0.25))
    ax.set_ylim((height + 0.25), 0)
    ax.set_axis_off()
    ax.set_facecolor("none")
    ax.set_zorder(5)
    return fig, canvas, ax


def _place(fig: Any, pixels: np.ndarray, top: int, left: int, fig_height: int) -> None:
    """Put ``pixels`` on the figure at 1:1 scale with its upper-left corner at (top, left)."""
    yo = fig_height - top - pixels.shape[0]
    fig.figimage(pixels, xo=left, yo=yo, origin="upper", zorder=1)


def _text_width(text: str, fontsize: float, *, bold: bool = False) -> float:
    """Rendered width of ``text`` in pixels at the module dpi."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(8, 8, _DPI)
    prop = FontProperties(size=fontsize, weight="bold" if bold else "normal")
    width, _, _ = renderer.get_text_width_height_descent(text, prop, ismath=False)
    return float(width)


def _canvas_to_pil(canvas: Any, width: int, height: int) -> Image.Image:
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[:height, :width, :3]), mode="RGB")


def _compose(
    image: Image.Image,
    plan: Plan,
    *,
    tile_size: int,
    best_resolution: tuple[int, int],
    title: str | None,
    thumbnail: Image.Image | None = None,
) -> tuple[Image.Image, _Layout]:
    """Draw the overlay; returns the RGB picture and its pixel layout (used by the tests)."""
    from matplotlib import patheffects

    g = plan.patches_per_side
    rows, cols = plan.grid
    multi = rows > 0 and cols > 0
    thumb_mask = _to_numpy(plan.thumbnail_mask).astype(bool)
    squashed = image if thumbnail is None else thumbnail
    thumb_src = np.asarray(squashed.convert("RGB").resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    thumb = shade_discarded(thumb_src, thumb_mask)

    crops = None
    v_top = v_left = 0
    vt = vb = vl = vr = 0
    if multi:
        canvas_px, _ = padded_canvas(image, best_resolution)
        crops_mask = _to_numpy(plan.crops_mask).astype(bool)
        if crops_mask.shape != (rows * g, cols * g):
            raise ValueError(f"crops_mask {crops_mask.shape} does not match grid {plan.grid} with g={g}")
        exp_hw = (rows * tile_size, cols * tile_size)
        if canvas_px.shape[:2] != exp_hw:
            raise ValueError(
                f"best_resolution {best_resolution} does not match grid {plan.grid} * {tile_size}"
            )
        shaded = shade_discarded(canvas_px, crops_mask)
        vt, vb, vl, vr = _valid_box(plan)
        px_per_cell_y = canvas_px.shape[0] / (rows * g)
        px_per_cell_x = canvas_px.shape[1] / (cols * g)
        v_top, v_bottom = round(vt * px_per_cell_y), round(vb * px_per_cell_y)
        v_left, v_right = round(vl * px_per_cell_x), round(vr * px_per_cell_x)
        crops = shaded[v_top:v_bottom, v_left:v_right]

    # ---- texts (measured first: the layout must leave room for them); the same numbers as the JSON summary
    text = panel_text(panel_numbers(plan))
    token_line, thumb_head = text.token_line, text.thumbnail_header
    crops_head = text.crops_header if crops is not None else ""
    title_w = max(_text_width(token_line, 13), _text_width(title, 15, bold=True) if title else 0.0)

    # ---- layout (pixels), scaled down uniformly if the natural size exceeds the limits
    n_title_lines = 2 if title else 1
    head = _MARGIN + n_title_lines * _TITLE_LINE + 6
    gap = _GAP if crops is not None else 0
    natural_w = tile_size + (crops.shape[1] if crops is not None else 0)
    natural_h = max(tile_size, crops.shape[0] if crops is not None else 0)
    scale = min(
        1.0,
        (_MAX_WIDTH - 2 * _MARGIN - gap) / natural_w,
        (_MAX_HEIGHT - head - _HEADER - _MARGIN) / natural_h,
    )
    thumb_img = _resize_rgb(thumb, scale)
    crops_img = _resize_rgb(crops, scale) if crops is not None else None
    # each panel sits in a slot wide enough for its header
    thumb_slot = max(thumb_img.shape[1], math.ceil(_text_width(thumb_head, 12)) + 4)
    crops_slot = 0
    if crops_img is not None:
        crops_slot = max(crops_img.shape[1], math.ceil(_text_width(crops_head, 12)) + 4)
    panels_w = thumb_slot + gap + crops_slot
    panels_h = max(thumb_img.shape[0], crops_img.shape[0] if crops_img is not None else 0)
    width = max(panels_w + 2 * _MARGIN, math.ceil(title_w) + 2 * _MARGIN)
    height = head + _HEADER + panels_h + _MARGIN
    x0 = (width - panels_w) // 2
    y0 = head + _HEADER
    thumb_box = (y0, x0, thumb_img.shape[0], thumb_img.shape[1])
    crops_box = None
    if crops_img is not None:
        crops_box = (y0, x0 + thumb_slot + gap, crops_img.shape[0], crops_img.shape[1])
    layout = _Layout(width, height, scale, thumb_box, crops_box, (v_top, v_left))

    fig, canvas, ax = _new_figure(width, height)
    _place(fig, thumb_img, thumb_box[0], thumb_box[1], height)
    if crops_img is not None and crops_box is not None:
        _place(fig, crops_img, crops_box[0], crops_box[1], height)

    # ---- titles and panel headers
    y = _MARGIN
    if title:
        ax.text(width / 2, y, title, ha="center", va="top", fontsize=15, fontweight="bold")
        y += _TITLE_LINE
    ax.text(width / 2, y + 2, token_line, ha="center", va="top", fontsize=13)

    def frame(box: tuple[int, int, int, int], header: str) -> None:
        from matplotlib.patches import Rectangle

        top, left, h, w = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), w + 1, h + 1, fill=False, lw=1.0, ec="#333333"))
        ax.text(left, top - 8, header, ha="left", va="bottom", fontsize=12)

    frame(thumb_box, thumb_head)
    if crops_box is not None:
        frame(crops_box, crops_head)
        _draw_crops(ax, plan, layout, tile_size, text.crop_labels, patheffects)

    picture = _canvas_to_pil(canvas, width, height)
    if title:
        picture.info[TITLE_KEY] = title  # render_grid leaves out a caption this title already states
    return picture, layout


def _draw_crops(
    ax: Any,
    plan: Plan,
    layout: _Layout,
    tile_size: int,
    labels: tuple[str, ...],
    patheffects: Any,
) -> None:
    """Crop borders (every ``g`` cells) and the per-crop ``labels`` (:func:`~globalcom2.viz.numbers.panel_text`)."""
    assert layout.crops_box is not None
    rows, cols = plan.grid
    g = plan.patches_per_side
    top, left, h, w = layout.crops_box
    s = layout.scale
    o_top, o_left = layout.crop_origin
    vt, vb, vl, vr = _valid_box(plan)
    stroke = [patheffects.withStroke(linewidth=4.5, foreground="black", alpha=0.55)]

    def to_x(canvas_x: float) -> float:
        return left + (canvas_x - o_left) * s

    def to_y(canvas_y: float) -> float:
        return top + (canvas_y - o_top) * s

    for c in range(1, cols):
        x = to_x(c * tile_size)
        if left < x < left + w:
            ax.plot(
                [x, x],
                [top, top + h],
                color=_BORDER_COLOR,
                lw=2.5,
                path_effects=stroke,
                solid_capstyle="butt",
            )
    for r in range(1, rows):
        y = to_y(r * tile_size)
        if top < y < top + h:
            ax.plot(
                [left, left + w],
                [y, y],
                color=_BORDER_COLOR,
                lw=2.5,
                path_effects=stroke,
                solid_capstyle="butt",
            )

    for j in range(rows * cols):
        r, c = divmod(j, cols)
        cell_r0, cell_r1 = max(r * g, vt), min((r + 1) * g, vb)
        cell_c0, cell_c1 = max(c * g, vl), min((c + 1) * g, vr)
        if cell_r1 <= cell_r0 or cell_c1 <= cell_c0:
            continue  # crop lies entirely in the padding
        x = to_x(cell_c0 * tile_size / g) + 6
        y = to_y(cell_r0 * tile_size / g) + 6
        ax.text(
            x,
            y,
            labels[j],
            ha="left",
            va="top",
            fontsize=11,
            color="white",
            linespacing=1.25,
            bbox={"boxstyle": "round,pad=0.3", "fc": "black", "ec": "none", "alpha": 0.62},
        )


# --------------------------------------------------------------------------------------------- public API


def render_overlay(
    image: Image.Image,
    plan: Plan,
    *,
    tile_size: int,
    best_resolution: tuple[int, int],
    title: str | None = None,
    out_path: str | Path | None = None,
    thumbnail: Image.Image | None = None,
) -> Image.Image:
    """Draw which tokens of ``image`` survive ``plan`` (paper Figure 7 style).

    Left panel: the thumbnail (image squashed to ``tile_size x tile_size``). Right panel (multi-crop plans
    only): the LLaVA-NeXT crop canvas cut to the unpadded area, with crop borders and per-crop labels
    ``r_j = 0.xxx`` and ``kept k/N_j`` (:func:`~globalcom2.viz.numbers.panel_text`). Discarded tokens are
    greyed (desaturated and lightened); kept tokens keep their colours. Padding is not shown. The suptitle
    carries ``title`` and the token budget; the title is also recorded in ``picture.info[TITLE_KEY]``.

    Args:
        image: the original photo.
        plan: kept-token record for this image.
        tile_size: vision-tower input side S (e.g. 336); ``plan.patches_per_side`` cells span it.
        best_resolution: ``(height, width)`` of the padded crop canvas (``select_best_resolution``); must equal
            ``(rows * tile_size, cols * tile_size)``. Ignored for single-tile plans.
        title: optional first suptitle line.
        out_path: if given, the picture is also saved there as PNG (parent folders are created).
        thumbnail: the picture the thumbnail squashes, when it is not ``image`` (Llama 4: ``image`` is the padded
            canvas, its global tile the photo alone).

    Returns:
        The rendered RGB picture (at most ~1400 px wide, 100 dpi).
    """
    picture, _ = _compose(
        image, plan, tile_size=tile_size, best_resolution=best_resolution, title=title, thumbnail=thumbnail
    )
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture


def _caption(caption: str | None, picture: Image.Image) -> str | None:
    """The caption to draw above ``picture``: None when the picture's own title already states it."""
    if not caption:
        return None
    title = picture.info.get(TITLE_KEY)
    return None if isinstance(title, str) and caption in title else caption


def render_grid(
    panels: Sequence[tuple[str | None, Image.Image]],
    out_path: str | Path | None = None,
    ncols: int = 2,
    *,
    max_width: int = 2400,
) -> Image.Image:
    """Stitch several rendered overlays, each under a caption, into one picture.

    Panels are scaled uniformly so that a row fits ``max_width``; each grid cell is as large as the largest
    (scaled) panel and panels are centred in their cells. A panel is shown once under one title: a caption that is
    None, empty, or already part of the title :func:`render_overlay` drew on the panel is left out (and a row
    without captions takes no caption space).

    Args:
        panels: ``(caption, picture)`` pairs, laid out row-major.
        out_path: if given, the grid is saved there as PNG.
        ncols: panels per row.
        max_width: upper bound of the output width in pixels.

    Returns:
        The stitched RGB picture.
    """
    if not panels:
        raise ValueError("render_grid needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    captions = [_caption(caption, picture) for caption, picture in panels]
    pics = [np.asarray(p.convert("RGB")) for _, p in panels]
    cell_w = max(p.shape[1] for p in pics)
    scale = min(1.0, (max_width - 2 * _MARGIN - (ncols - 1) * _GAP) / (ncols * cell_w))
    pics = [_resize_rgb(p, scale) for p in pics]
    cell_w = max(p.shape[1] for p in pics)
    row_h = [max(p.shape[0] for p in pics[r * ncols : (r + 1) * ncols]) for r in range(nrows)]
    cap_h = [34 if any(captions[r * ncols : (r + 1) * ncols]) else 0 for r in range(nrows)]
    width = 2 * _MARGIN + ncols * cell_w + (ncols - 1) * _GAP
    height = 2 * _MARGIN + sum(cap_h) + sum(row_h) + (nrows - 1) * _GAP
    row_top = [_MARGIN + r * _GAP + sum(cap_h[:r]) + sum(row_h[:r]) for r in range(nrows)]

    fig, canvas, ax = _new_figure(width, height)
    for i, (caption, pic) in enumerate(zip(captions, pics, strict=True)):
        r, c = divmod(i, ncols)
        cell_left = _MARGIN + c * (cell_w + _GAP)
        if caption:
            ax.text(
                cell_left + cell_w / 2,
                row_top[r] + cap_h[r] / 2,
                caption,
                ha="center",
                va="center",
                fontsize=15,
                fontweight="bold",
            )
        _place(fig, pic, row_top[r] + cap_h[r], cell_left + (cell_w - pic.shape[1]) // 2, height)
    picture = _canvas_to_pil(canvas, width, height)
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture
