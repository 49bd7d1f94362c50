"""LLaVA "anyres" tiling (LLaVA-NeXT, LLaVA-OneVision): thumbnail first, then the unpadded crop grid + newlines.

The shared part of the two LLaVA families, written once:

- **Geometry.** The anyres pinpoints pick a ``rows x cols`` grid of crops; the crops form a padded
  ``(rows*g) x (cols*g)`` patch grid of which the image fills a centred *valid box* (:func:`valid_box`, HF's
  ``unpad_image`` rule). The LLM receives the thumbnail's ``g*g`` tokens, then the crop tokens of the valid box
  (LLaVA-OneVision may down-sample them, see its adapter) row by row, each row followed by ``image_newline``.
- **Selection.** HF's own ``pack_image_features`` runs unchanged; the patched one then picks rows of its output:
  the kept thumbnail tokens, the kept crop tokens and the newlines, for every image of the batch
  (:func:`plan_anyres_batch`: one :func:`~globalcom2.core.select.select_images` call for all images).
- **Budget count.** ``int(g*g*R) + int(R*H*W) + H`` for a crop token grid of ``H x W``
  (:func:`~globalcom2.core.budget.budget_counts` plus one newline per row); the processor's
  ``_get_number_of_features`` is patched on the instance to return it. Under ``max_image_tokens=T`` each image
  gets its own R (:meth:`AnyresGeometry.image_ratio`: the H newlines are the layout overhead), which the count,
  the selection and the plan all take from the geometry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.budget import budget_counts
from ..core.layout import CropLayout, thumbnail_region_map, tiles_to_grid
from ..core.plan import Plan
from ..core.ranking import true_indices
from ..core.resize import bilinear_resize
from ..core.select import Selection, SelectionInput, kept_crop_tokens, select_images
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError
from .family import FamilyAdapter

Box = tuple[int, int, int, int]  # (top, bottom, left, right), half-open, in patch cells


def valid_box(orig_height: int, orig_width: int, grid_height: int, grid_width: int) -> Box:
    """Unpadded area of the padded crop grid, by the rule of HF's ``unpad_image`` (LLaVA-NeXT / OneVision).

    Args:
        orig_height, orig_width: original image size in pixels.
        grid_height, grid_width: padded crop grid in patch cells, ``rows*g`` and ``cols*g``.

    Returns:
        ``(top, bottom, left, right)``; the image's tokens are ``grid[top:bottom, left:right]``.
    """
    if orig_height <= 0 or orig_width <= 0:
        raise ValueError(f"image size must be positive, got {orig_height}x{orig_width} (height x width)")
    if orig_width / orig_height > grid_width / grid_height:
        new_height = int(round(orig_height * (grid_width / orig_width), 7))
        pad = (grid_height - new_height) // 2
        return pad, grid_height - pad, 0, grid_width
    new_width = int(round(orig_width * (grid_height / orig_height), 7))
    pad = (grid_width - new_width) // 2
    return 0, grid_height, pad, grid_width - pad


def anyres_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """Crop grid (rows, cols) that anyres picks for an image of ``(height, width)`` pixels."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution(tuple(image_size), pinpoints)
    return best_h // tile, best_w // tile


def footprint(token_mask: torch.Tensor, box: Box, padded: tuple[int, int]) -> torch.Tensor:
    """Spread a crop-token mask back onto the padded patch grid (each patch takes the token that covers it).

    Patch ``(top + i, left + j)`` of the valid box lies under token ``(i * H // h, j * W // w)``; padding stays
    False. Without down-sampling (``H x W == h x w``) this places the mask in the box.
    """
    top, bottom, left, right = box
    h, w = bottom - top, right - left
    out = torch.zeros(padded, dtype=torch.bool, device=token_mask.device)
    big, small = token_mask.shape
    if h > 0 and w > 0 and big > 0 and small > 0:
        ri = torch.arange(h, device=token_mask.device) * big // h
        ci = torch.arange(w, device=token_mask.device) * small // w
        out[top:bottom, left:right] = token_mask[ri][:, ci]
    return out


@dataclass(frozen=True)
class AnyresGeometry:
    """Where one image's tokens sit (all in patch cells).

    Attributes:
        grid: ``(rows, cols)`` of crops chosen by the anyres pinpoints.
        g: patches per tile side.
        box: valid area ``(top, bottom, left, right)`` of the padded ``(rows*g) x (cols*g)`` grid.
        token_grid: ``(H, W)`` crop tokens the LLM receives (the box's size unless the family down-samples).
    """

    grid: tuple[int, int]
    g: int
    box: Box
    token_grid: tuple[int, int]

    @property
    def resampled(self) -> bool:
        top, bottom, left, right = self.box
        return self.token_grid != (bottom - top, right - left)

    def num_tokens(self, ratio: float | None, newline: bool = True) -> int:
        """Image tokens handed to the LLM: uncompressed (``ratio=None``) or in budget mode at ``ratio``."""
        h, w = self.token_grid
        thumb, crops = (self.g**2, h * w) if ratio is None else budget_counts(self.g**2, h * w, ratio)
        return thumb + crops + (h if newline else 0)

    def image_ratio(self, config: Any, newline: bool = True) -> float:
        """This image's R under ``config``: its ``ratio``, or the largest R whose count fits ``max_image_tokens``.

        See :meth:`globalcom2.GlobalComConfig.image_ratio`; the layout overhead is one newline per crop-token row.
        """
        h, w = self.token_grid
        return float(config.image_ratio(self.g**2, h * w, h if newline else 0))

    def num_budget_tokens(self, config: Any, newline: bool = True) -> int:
        """Budget-mode image tokens of this image under ``config`` (ratio or ``max_image_tokens``)."""
        return self.num_tokens(self.image_ratio(config, newline), newline)


def anyres_geometry(
    image_size: tuple[int, int],
    pinpoints: list,
    tile: int,
    g: int,
    token_grid: Callable[[Box, int], tuple[int, int]] | None = None,
) -> AnyresGeometry:
    """Tiling of one image of ``(height, width)`` pixels: anyres grid, valid box and crop token grid.

    ``token_grid(box, g)`` gives the ``(H, W)`` the LLM receives (default: the valid box itself, LLaVA-NeXT);
    :meth:`AnyresAdapter.geometry` passes its family's rule. Needs no model: the vLLM plugin, the analytic FLOPs
    table and the evaluation call it with a config's pinpoints.
    """
    rows, cols = anyres_grid(image_size, pinpoints, tile)
    box = valid_box(int(image_size[0]), int(image_size[1]), rows * g, cols * g)
    size = (box[1] - box[0], box[3] - box[2]) if token_grid is None else token_grid(box, g)
    return AnyresGeometry((rows, cols), g, box, size)


def resample_blocks(box: Box, token_grid: tuple[int, int], g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop row / column of every row / column of the crop token grid.

    Token (y, x) is anchored at the patch nearest to its bilinear sample point, row
    ``top + floor((y + 0.5) * h / H)`` of the padded crop grid (columns alike), and belongs to that patch's crop.
    Without down-sampling (``H == h``) the anchor is the token's own patch.
    """
    top, bottom, left, right = box
    height, width = token_grid
    anchor_rows = top + ((2 * torch.arange(height) + 1) * (bottom - top)) // max(2 * height, 1)
    anchor_cols = left + ((2 * torch.arange(width) + 1) * (right - left)) // max(2 * width, 1)
    return anchor_rows // g, anchor_cols // g


def anyres_selection_input(
    tile_scores: torch.Tensor, geo: AnyresGeometry, ratio: float
) -> tuple[SelectionInput, CropLayout]:
    """Reduce one anyres image to the core's inputs (:class:`~globalcom2.core.select.SelectionInput`).

    The crop scores of the valid box are resized to the token grid when the family down-samples (as HF resizes
    the features), every token belongs to the crop of its anchor patch (:func:`resample_blocks`), and the
    thumbnail map resized to the token grid gives the global sub-maps (Eq. 5). Index and arithmetic work only:
    nothing here reads the device.

    Args:
        tile_scores: ``(1 + rows*cols, g*g)``: thumbnail first, then the crops row-major (HF's tile order).
        geo: the image's geometry.
        ratio: the image's R (:meth:`AnyresGeometry.image_ratio`).
    """
    rows, cols = geo.grid
    g = geo.g
    top, bottom, left, right = geo.box
    device = tile_scores.device
    crops = tiles_to_grid(tile_scores[1:].float().reshape(rows * cols, g, g), rows, cols)[
        top:bottom, left:right
    ]
    local = bilinear_resize(crops, geo.token_grid) if geo.resampled else crops.double()
    layout = crop_layout(geo.box, geo.token_grid, g, geo.grid)
    thumb = tile_scores[0].float()
    global_map = bilinear_resize(thumb.reshape(g, g), geo.token_grid)
    image = SelectionInput(
        thumb, layout.to_table(local.to(global_map.dtype)), layout.valid(device), layout.to_table(global_map),
        thumbnail_region_map(g, rows, cols, device=device), ratio, geo.token_grid[0] * geo.token_grid[1],
    )  # fmt: skip
    return image, layout


@functools.lru_cache(maxsize=512)
def crop_layout(box: Box, token_grid: tuple[int, int], g: int, grid: tuple[int, int]) -> CropLayout:
    """The :class:`CropLayout` of one geometry (host-side, built once per image shape and reused: its tensors are
    never written, and building it reads block sizes on the host, which must not wait for the device)."""
    row_block, col_block = resample_blocks(box, token_grid, g)
    return CropLayout.from_blocks(row_block, col_block, grid)


def packed_positions(geo: AnyresGeometry, newline: bool, device: Any = None) -> torch.Tensor:
    """Long ``(H, W + newline)``: position of every crop token (and row newline) in HF's packed sequence."""
    height, width = geo.token_grid
    per_row = width + int(newline)
    return geo.g**2 + torch.arange(height * per_row, device=device).reshape(height, per_row)


def official_crop_order(
    sel: Selection, layout: CropLayout, geo: AnyresGeometry, newline: bool, count: int | None = None
) -> torch.Tensor:
    """Crop tokens in the official packed-slot layout (LLaVA-NeXT reference mode).

    Crop j's kept token with index v in its valid-token list (its table position) is written at tile position
    (v // g, v % g), as if the valid block were packed into the tile's top-left; the padded
    ``(rows*g) x (cols*g)`` grid is then read in raster order with a newline after each of its rows*g rows.

    Returns:
        Long positions in HF's packed sequence with ``image_newline`` appended as its last row.
    """
    rows, cols = geo.grid
    g, n = geo.g, rows * cols
    device = sel.crop_keep.device
    positions = packed_positions(geo, newline, device)
    width = geo.token_grid[1]
    shown = torch.where(sel.crop_keep, layout.to_table(positions[:, :width], -1), -1)  # at valid-list index
    slots = torch.full((n, g * g), -1, dtype=torch.long, device=device)
    slots[:, : shown.shape[1]] = shown
    grid = tiles_to_grid(slots.reshape(n, g, g), rows, cols)
    # Every newline is the same embedding: the official layout points them all at one ``image_newline`` row appended
    # after HF's packed sequence (HF's own sequence has none when the valid box has no rows).
    newline_col = torch.full((rows * g, int(newline)), geo.num_tokens(None, newline), device=device)
    seq = torch.cat([grid, newline_col], dim=1).reshape(-1)
    if count is None:  # ``count``: kept crop tokens, when known (then no host synchronisation)
        return seq[seq >= 0]
    return seq[true_indices(seq >= 0, count + rows * g * int(newline))]


def plan_anyres_batch(
    tile_scores: Sequence[torch.Tensor],
    geos: Sequence[AnyresGeometry],
    config: Any,
    *,
    newline: bool = True,
    official_order: bool = False,
) -> list[tuple[Plan, torch.Tensor]]:
    """Plan the anyres images of a batch from their tile scores, with one vectorised selection for all of them
    (the step every LLaVA family and the vLLM plugin share).

    Args:
        tile_scores: per image ``(1 + rows*cols, g*g)``: thumbnail first, then the crops row-major.
        geos: per image its :class:`AnyresGeometry`.
        config: a :class:`~globalcom2.GlobalComConfig`.
        newline: whether HF appends ``image_newline`` after each crop row.
        official_order: in reference mode, emit crop tokens in the official packed-slot layout
            (:func:`official_crop_order`) instead of raster order.

    Returns:
        ``(plan, index)`` per image; ``index`` picks the kept tokens from HF's packed sequence
        ``[g*g thumbnail tokens, then H rows of W crop tokens (+ newline)]`` (with ``image_newline`` appended as
        one more row, which the official order uses): thumbnail first, then the crop grid row by row with its
        newlines. Budget mode reads nothing from the device; reference mode reads the kept counts once.
    """
    ratios = [geo.image_ratio(config, newline) for geo in geos]
    prepared = [
        anyres_selection_input(t, geo, r) for t, geo, r in zip(tile_scores, geos, ratios, strict=True)
    ]
    images = [image for image, _ in prepared]
    selections = select_images(images, **config.selection_options)
    counts = kept_crop_tokens(images, selections, config.mode)
    return [
        _anyres_plan(sel, layout, geo, config, ratio, count, newline, official_order)
        for sel, (_, layout), geo, ratio, count in zip(
            selections, prepared, geos, ratios, counts, strict=True
        )
    ]


def _anyres_plan(
    sel: Selection, layout: CropLayout, geo: AnyresGeometry, config: Any, ratio: float, count: int,
    newline: bool, official_order: bool,
) -> tuple[Plan, torch.Tensor]:  # fmt: skip
    """One image's plan and packed-sequence index from its selection (``count``: its kept crop tokens)."""
    keep = layout.from_table(sel.crop_keep)  # (H, W)
    if official_order and config.mode == "reference":
        crops = official_crop_order(sel, layout, geo, newline, count)
    else:
        row_mask = torch.cat([keep, keep.new_ones(keep.shape[0], int(newline))], dim=1)
        kept = true_indices(row_mask.reshape(-1), count + geo.token_grid[0] * int(newline))
        crops = packed_positions(geo, newline, keep.device).reshape(-1)[kept]
    index = torch.cat([sel.thumbnail_order.to(keep.device), crops])
    rows, cols = geo.grid
    plan = Plan(
        grid=geo.grid,
        thumbnail_mask=sel.thumbnail_keep.reshape(geo.g, geo.g),
        crops_mask=footprint(keep, geo.box, (rows * geo.g, cols * geo.g)),
        crop_ratios=sel.crop_ratios,
        num_tokens=int(index.numel()),
        num_tokens_full=geo.num_tokens(None, newline),
        valid_box=geo.box,
        crop_keep_counts=sel.crop_keep_counts,
        crop_valid_counts=sel.crop_valid_counts,
        mode=config.mode,
        thumbnail_order=sel.thumbnail_order,
        token_mask=keep if geo.resampled else None,
        token_grid=geo.token_grid if geo.resampled else None,
        ratio=ratio,
    )
    return plan, index


def plan_anyres(
    tile_scores: torch.Tensor,
    geo: AnyresGeometry,
    config: Any,
    *,
    newline: bool = True,
    official_order: bool = False,
) -> tuple[Plan, torch.Tensor]:
    """Plan one anyres image: :func:`plan_anyres_batch` on a batch of one (same arguments, one image)."""
    return plan_anyres_batch([tile_scores], [geo], config, newline=newline, official_order=official_order)[0]


class AnyresAdapter(FamilyAdapter):
    token_layout: ClassVar[str] = "thumbnail + crops + newlines"
    """Shared base of the LLaVA-NeXT and LLaVA-OneVision adapters (see the module docstring).

    ``official_order``: reference mode emits crop tokens in the official packed-slot layout (LLaVA-NeXT).
    """

    official_order: bool = False
    supports_max_image_tokens = True

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)
        vcfg = model.config.vision_config
        self.tile = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.g = self.tile // self.patch_size
        self.pinpoints = model.config.image_grid_pinpoints

    # -- checks ----------------------------------------------------------------------------------------------
    def check_processor(self) -> None:
        processor: Any = self.processor
        ip = processor.image_processor
        if [list(p) for p in ip.image_grid_pinpoints] != [list(p) for p in self.pinpoints]:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image_grid_pinpoints differ ({ip.image_grid_pinpoints} vs {self.pinpoints})"
            )
        strategy = self.model.config.vision_feature_select_strategy
        p_strategy = getattr(processor, "vision_feature_select_strategy", None)
        if p_strategy is not None and p_strategy != strategy:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: vision_feature_select_strategy {p_strategy!r} vs {strategy!r} "
                "(the processor's placeholder count would be off by one per image)"
            )

    # -- geometry (families override token_grid / token_blocks / token_scores) ------------------------------------
    def geometry(self, image_size: tuple[int, int], *, tile: int | None = None, g: int | None = None,
                 **options: Any) -> AnyresGeometry:  # fmt: skip
        """Tiling of one image of ``(height, width)`` pixels."""
        return anyres_geometry(
            image_size, self.pinpoints, self.tile if tile is None else tile, self.g if g is None else g,
            functools.partial(self.token_grid, **options),
        )  # fmt: skip

    def token_grid(self, box: Box, g: int, **options: Any) -> tuple[int, int]:
        """``(H, W)`` of the crop tokens the LLM receives: the valid box itself."""
        return box[1] - box[0], box[3] - box[2]

    # -- counts --------------------------------------------------------------------------------------------------
    def processor_patch_size(self) -> int:
        return int(self.processor.patch_size)

    def _num_features(self, original: Any, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Processor-side count in budget mode: HF's count with the thumbnail and crop terms swapped in."""
        geo = self.geometry((orig_height, orig_width), tile=height, g=height // self.processor_patch_size())
        hf = original(orig_height, orig_width, height, width)
        return hf - geo.num_tokens(None) + self.count_tokens(geo)

    def count_tokens(self, geo: AnyresGeometry, newline: bool = True) -> int:
        """Budget-mode image tokens of one image (baselines with other counts override this)."""
        return geo.num_budget_tokens(self.config, newline)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the LLM receives for one image of ``height x width`` pixels in budget mode."""
        return self.count_tokens(self.geometry((height, width)))

    def image_ratio(self, geo: AnyresGeometry, newline: bool = True) -> float:
        """R of one image (baselines whose count is not the budget count override this)."""
        return geo.image_ratio(self.config, newline)

    def ratio_for_image(self, height: int, width: int) -> float:
        return self.image_ratio(self.geometry((height, width)))

    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        original = self.processor._get_number_of_features
        handle.patch(
            self.processor, "_get_number_of_features", functools.partial(self._num_features, original)
        )

    # -- selection (wraps pack_image_features) -------------------------------------------------------------------
    def install_family(self, handle: GlobalComHandle) -> None:
        original = self.inner.pack_image_features
        handle.patch(self.inner, "pack_image_features", self._packing(handle, original))

    def _packing(self, handle: GlobalComHandle, original: Any) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def pack_image_features(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            packed, _ = original(*args, **kwargs)
            plans, out = self.select_packed(handle, packed, bound.arguments)
            handle.publish(plans)
            lens = torch.tensor([int(x.shape[0]) for x in out], dtype=torch.long, device=packed[0].device)
            return out, lens

        return pack_image_features

    def select_packed(self, handle: GlobalComHandle, packed: list[torch.Tensor],
                      arguments: dict[str, Any]) -> tuple[list[Plan], list[torch.Tensor]]:  # fmt: skip
        """Pick the kept rows of HF's packed sequence of every image; returns (plans, kept rows)."""
        scores = self.take_scores(handle)
        features = arguments["image_features"]
        image_sizes = arguments["image_sizes"]
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        )
        newline = arguments.get("image_newline") is not None
        options = self.geometry_options(arguments)
        tiles = [int(feats.shape[0]) for feats in features]
        if sum(tiles) != scores.shape[0]:
            raise RuntimeError(
                f"GlobalCom²: {scores.shape[0]} tiles were scored but {sum(tiles)} were packed"
            )
        per_image = scores.split(tiles)
        # Every image of more than one tile is planned in one batched selection; a single tile (multi-image
        # prompts, tiny images) is never compressed.
        multi = [i for i, t in enumerate(tiles) if t > 1]
        planned = self.plan_images(
            [per_image[i].to(packed[i].device) for i in multi],
            [self.geometry((int(sizes[i][0]), int(sizes[i][1])), **options) for i in multi],
            newline,
        )
        by_image = dict(zip(multi, planned, strict=True))
        plans, out = [], []
        for i, (seq, (h, w)) in enumerate(zip(packed, sizes, strict=True)):
            plan, index = by_image[i] if i in by_image else self.plan_single_tile(newline, seq.device)
            if seq.shape[0] != plan.num_tokens_full:
                raise RuntimeError(
                    f"GlobalCom²: HF packed {seq.shape[0]} tokens for an image of {h}x{w}, the {self.family} "
                    f"geometry gives {plan.num_tokens_full}; this transformers version packs differently"
                )
            if newline:  # the official token order may need a newline where HF's sequence has none
                seq = torch.cat([seq, arguments["image_newline"][None].to(seq)])
            out.append(seq.index_select(0, index))  # whole-row copies (faster on a CPU than seq[index])
            plans.append(plan)
        return plans, out

    def geometry_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Geometry options taken from ``pack_image_features``' arguments (none by default)."""
        return {}

    def plan_single_tile(self, newline: bool, device: Any) -> tuple[Plan, torch.Tensor]:
        """An image encoded as one tile is not compressed: its g*g tokens (plus a newline if HF adds one)."""
        n = self.g * self.g + int(newline)
        plan = Plan(
            grid=(0, 0),
            thumbnail_mask=torch.ones(self.g, self.g, dtype=torch.bool, device=device),
            crops_mask=torch.zeros(0, 0, dtype=torch.bool, device=device),
            crop_ratios=torch.zeros(0, device=device),
            num_tokens=n,
            num_tokens_full=n,
            mode=self.config.mode,
            thumbnail_order=torch.arange(self.g * self.g, device=device),
            ratio=1.0,
        )
        return plan, torch.arange(n, device=device)

    def plan_images(
        self, tile_scores: Sequence[torch.Tensor], geos: Sequence[AnyresGeometry], newline: bool = True
    ) -> list[tuple[Plan, torch.Tensor]]:
        """Plan the multi-tile images of a batch at once (see :func:`plan_anyres_batch`); baselines override this."""
        planned = plan_anyres_batch(
            tile_scores, geos, self.config, newline=newline, official_order=self.official_order
        )
        if self.config.mode == "budget":
            for (plan, _), geo in zip(planned, geos, strict=True):
                if plan.num_tokens != self.count_tokens(geo, newline):  # guards the invariant
                    raise RuntimeError("GlobalCom²: budget-mode selection and count disagree")
        return planned

    def plan_image(
        self, tile_scores: torch.Tensor, geo: AnyresGeometry, newline: bool = True
    ) -> tuple[Plan, torch.Tensor]:
        """Plan one image: :meth:`plan_images` on a batch of one."""
        return self.plan_images([tile_scores], [geo], newline)[0]

    # -- reference mode and the vision side --------------------------------------------------------------------
    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        features = self.inner.get_image_features(
            kwargs.pop("pixel_values"),
            kwargs.pop("image_sizes"),
            vision_feature_layer=kwargs.pop("vision_feature_layer", None),
            vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
            return_dict=True,
        )
        return {"image": features}

    def plan_for_image(self, handle: GlobalComHandle, image: Any) -> Plan:
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.no_grad():
            self.inner.get_image_features(pixel_values, inputs["image_sizes"].to(self.model.device))
        return handle.state.plans[0]  # type: ignore[index]


__all__ = [
    "AnyresAdapter",
    "AnyresGeometry",
    "anyres_geometry",
    "anyres_grid",
    "crop_layout",
    "footprint",
    "official_crop_order",
    "packed_positions",
    "anyres_selection_input",
    "plan_anyres",
    "plan_anyres_batch",
    "resample_blocks",
    "valid_box",
]
