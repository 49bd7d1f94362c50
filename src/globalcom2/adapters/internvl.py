"""InternVL adapter: GlobalCom² (paper Eq. 1-6) on HF `InternVLForConditionalGeneration` (dynamic tiles).

InternVL tiles an image into a rows x cols grid of crops chosen by aspect ratio (no padding: the image is
stretched to the grid), appends the **thumbnail last**, and hands the LLM ``(g/2)**2`` tokens per tile after
``pixel_shuffle`` merges every 2 x 2 patches into one token (256 for 448 px tiles of 14 px patches).

**Importance.** InternViT has a [CLS] token: its row of the *last* layer's attention scores the patches (Eq. 1,
logits or softmax as for LLaVA-NeXT). The features come from that layer, so it runs anyway: forward hooks take the
[CLS] query and the keys it computes itself (the outputs of its ``q_norm``/``k_norm``, which are Identity when the
checkpoint has no q/k norms) and one small matmul per tile scores them. The patch
scores are **summed over each 2 x 2 pixel-shuffle group** (:func:`merge_pool`): a
merged token carries the share of the [CLS] row of the four patches it is made of, so crop richness S_j (Eq. 2)
is the same sum over the crop's patches as without merging, and inside a tile the ranking equals the mean's.
``importance="cosine"`` scores Eq. 7 on the merged tokens (the projector's input) instead.

**Selection.** On the merged grid every crop is a full g' x g' block (no unpadding): crop richness from the
thumbnail's regions, r_j (Eq. 3-4), holistic scores with the thumbnail map resized to the whole crop grid (Eq. 5),
top tokens per crop (Eq. 6) -- :func:`~globalcom2.core.select.select_images`; among equal scores the token earlier
in the raster order of the pixel-shuffled grid wins. Kept tokens reach the LLM in
InternVL's order: crop after crop (raster inside each), then the thumbnail. Budget mode keeps
``int(N*R) + int(R*n*N)`` tokens for n crops of N tokens (a function of the tile count only; under
``max_image_tokens=T`` R is the largest that keeps ``2 + int(N*R) + int(R*n*N) <= T``, the ``<img>``/``</img>``
markers counted: :func:`internvl_image_ratio`); reference mode
keeps int(N*r_j) per crop and the thumbnail in descending score order. An image InternVL encodes as one tile
(small or near-square images; no thumbnail is added then) is its own global view: it keeps its top int(N*R) tokens
by the thumbnail rule (Eq. 1-2), so R applies to every image.

**What the HF stack does not give us, and what we do about it.** ``InternVLModel.get_image_features`` receives
only a flat batch of tiles: no image sizes, no per-image tile counts (the processor pops ``num_patches``) and no
tile grid. The grid cannot be recovered from the tile count (6 crops may be 2x3, 3x2, 1x6 or 6x1), and GlobalCom²
needs it (crop regions on the thumbnail, sub-maps). So the patched processor adds one input, ``globalcom2_tile_grids``
(Long ``(num_images, 2)``: rows, cols per image, recomputed with HF's own ``get_optimal_tiled_canvas`` and checked
against ``num_patches``), and the patched ``forward``/``generate`` take it off before HF sees it; calling
``model.model.get_image_features(pixel_values, globalcom2_tile_grids=...)`` directly also works. Inputs without
grids (videos, or images processed before :func:`globalcom2.apply`) pass through uncompressed with a warning;
a single call mixing videos and images is refused (their tiles are interleaved in ``pixel_values`` and the model
cannot tell them apart). Compressed image features come back as ``pooler_output`` of shape
``(num_kept_tokens, 1, D)``: tiles no longer hold equal token counts, and one row per token keeps
``generate``'s per-sample expansion (beam search, ``num_return_sequences``) correct.

What is patched (recorded on the handle, undone by ``remove()``): the scoring hooks on the tower's last layer (or a
pre-hook on the projector for cosine), ``InternVLModel.get_image_features``, ``InternVLProcessor._process_images`` (grids),
``replace_image_token`` and ``_get_num_multimodal_tokens`` (budget counts), and ``forward``/``generate``.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from ..core.budget import budget_counts
from ..core.layout import grid_to_tiles, thumbnail_region_map, tiles_to_grid
from ..core.plan import Plan
from ..core.ranking import true_indices
from ..core.resize import bilinear_resize
from ..core.select import SelectionInput, kept_crop_tokens, select_images
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError
from .family import FamilyAdapter
from .registry import register_adapter
from .towers import Tap, TowerInfo, describe_tower

#: Processor output / model input carrying each image's crop grid (rows, cols).
GRID_KEY = "globalcom2_tile_grids"


def merge_pool(scores: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Sum patch scores over the ``factor x factor`` groups that pixel shuffle merges into one token.

    Summing keeps the crop richness S_j of Eq. 2 equal to the sum over the crop's patches, and within a tile it
    ranks tokens as the mean would.

    Args:
        scores: ``(T, g*g)`` per-patch scores in raster order.

    Returns:
        ``(T, (g/factor)**2)`` in raster order of the merged grid.
    """
    t, gg = scores.shape
    g = int(round(gg**0.5))
    if g * g != gg or g % factor:
        raise ValueError(f"cannot merge a {g}x{g} patch grid ({gg} scores) by {factor}x{factor}")
    m = g // factor
    return scores.reshape(t, m, factor, m, factor).sum(dim=(2, 4)).reshape(t, m * m)


def describe_internvl_tower(tower: Any) -> TowerInfo:
    """Scoring pieces of InternViT (``InternVLVisionModel``); other towers as :func:`describe_tower`."""
    if type(tower).__name__ != "InternVLVisionModel":
        return describe_tower(tower)
    layer = tower.encoder.layer[-1]
    att = layer.attention

    def q_proj(x: torch.Tensor) -> torch.Tensor:
        return att.q_norm(att.q_proj(x))  # q/k norms act on the projected vectors (Identity when absent)

    def k_proj(x: torch.Tensor) -> torch.Tensor:
        return att.k_norm(att.k_proj(x))

    return TowerInfo(
        "internvit", layer, layer.layernorm_before, q_proj, k_proj, int(att.num_heads), 1, True,
        Tap(att.q_norm), Tap(att.k_norm),  # the layer's q and k after its q/k norms (Identity when absent)
        att.k_proj if isinstance(att.k_norm, torch.nn.Identity) else None,
    )  # fmt: skip


def tile_grid(
    height: int, width: int, tile: tuple[int, int], min_patches: int, max_patches: int
) -> tuple[int, int]:
    """(rows, cols) of crops InternVL's image processor picks for an image of ``height x width`` pixels."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas((height, width), tile, min_patches, max_patches)
    return rows, cols


def num_tiles(rows: int, cols: int) -> int:
    """Tiles in ``pixel_values`` for one image: the crops plus the thumbnail, or one tile when there is one crop."""
    return 1 if rows * cols == 1 else rows * cols + 1


def tile_grids_for(
    image_sizes: list[tuple[int, int]],
    counts: list[int],
    option: Callable[[str], Any],
    rule: Callable[..., tuple[int, int]] | None = None,
) -> list[list[int]]:
    """(rows, cols) of every image by InternVL's tiling rule, checked against the tile counts HF produced.

    ``option(name)`` reads the image processor's effective option (``size``, ``crop_to_patches``, ``min_patches``,
    ``max_patches``): the call's value, else the processor's. The transformers adapter and the vLLM plugin share it.
    ``rule``: the grid rule ``(height, width, tile, min_patches, max_patches) -> (rows, cols)`` (default
    :func:`tile_grid`, InternVL's; Cohere2 Vision has its own).
    """
    size = option("size")
    tile = (size["height"], size["width"]) if isinstance(size, Mapping) else (size.height, size.width)
    crop = bool(option("crop_to_patches")) and int(option("max_patches")) > 1
    grids = []
    for (height, width), count in zip(image_sizes, counts, strict=True):
        rows, cols = (
            (rule or tile_grid)(height, width, tile, int(option("min_patches")), int(option("max_patches")))
            if crop
            else (1, 1)
        )
        if num_tiles(rows, cols) != int(count):
            raise RuntimeError(
                f"GlobalCom²: the image processor made {count} tiles for a {height}x{width} image but its "
                f"tiling rule gives a {rows}x{cols} grid; cannot recover the tile grid"
            )
        grids.append([rows, cols])
    return grids


def image_sizes_of(images: Any) -> list[tuple[int, int]]:
    """(height, width) of every image of a processor call's ``images`` (PIL, arrays or tensors, nested or not)."""
    from transformers.image_utils import (
        get_image_size,
        infer_channel_dimension_format,
        make_flat_list_of_images,
        to_numpy_array,
    )

    sizes = []
    flat: list[Any] = list(make_flat_list_of_images(images))  # type: ignore[arg-type]
    for image in flat:
        if hasattr(image, "size") and hasattr(image, "mode"):  # PIL
            sizes.append((int(image.height), int(image.width)))
        else:
            arr = to_numpy_array(image)
            h, w = get_image_size(arr, infer_channel_dimension_format(arr))
            sizes.append((int(h), int(w)))
    return sizes


#: Layout tokens of one image besides its ``<IMG_CONTEXT>`` run: ``<img>`` and ``</img>`` (count towards T).
IMAGE_MARKERS = 2


def _thumbnail_and_crops(tiles: int, tokens_per_tile: int) -> tuple[int, int]:
    """(N, sum_j N_j) of an image of ``tiles`` tiles: a lone tile is its own global view, without crops."""
    return tokens_per_tile, (tiles - 1) * tokens_per_tile if tiles > 1 else 0


def internvl_image_ratio(
    config: Any, tiles: int, tokens_per_tile: int, overhead: int = IMAGE_MARKERS
) -> float:
    """R of one InternVL image of ``tiles`` tiles (:meth:`globalcom2.GlobalComConfig.image_ratio`, markers counted).

    Needs no model: the vLLM plugin calls it with the HF config's tokens per tile.

    Args:
        overhead: the image's layout tokens besides its runs (they count towards ``max_image_tokens``):
            InternVL's ``<img>``/``</img>`` by default; families with this tile layout but other markers (Idefics3's
            per-crop markers) pass their own.
    """
    return float(config.image_ratio(*_thumbnail_and_crops(tiles, tokens_per_tile), overhead))


def internvl_num_image_tokens(
    config: Any, tiles: int, tokens_per_tile: int, overhead: int = IMAGE_MARKERS
) -> int:
    """``<IMG_CONTEXT>`` tokens of one image of ``tiles`` tiles in budget mode (the markers not included; ``overhead``
    as in :func:`internvl_image_ratio`)."""
    n, s = _thumbnail_and_crops(tiles, tokens_per_tile)
    return sum(budget_counts(n, s, internvl_image_ratio(config, tiles, tokens_per_tile, overhead)))


def internvl_selection_input(
    tile_scores: torch.Tensor, grid: tuple[int, int], g: int, ratio: float
) -> SelectionInput:
    """Reduce one InternVL image to the core's inputs: crops are full g x g blocks of the pixel-shuffled grid, so
    table row j is crop j in raster order (tile order: crops row-major, then the thumbnail; a lone tile is the
    whole image, its own global view, without crops)."""
    n_tok = g * g
    rows, cols = grid
    n = rows * cols if num_tiles(rows, cols) > 1 else 0
    thumb = tile_scores[n].float()
    device = thumb.device
    global_map = bilinear_resize(thumb.reshape(g, g), (rows * g, cols * g)) if n else thumb.new_zeros(0, 0)
    return SelectionInput(
        thumb, tile_scores[:n].double(), torch.ones(n, n_tok, dtype=torch.bool, device=device),
        grid_to_tiles(global_map, rows, cols).reshape(n, n_tok) if n else thumb.new_zeros(0, n_tok),
        thumbnail_region_map(g, rows, cols, device=device), ratio, n * n_tok,
    )  # fmt: skip


def plan_internvl_batch(
    tile_scores: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    g: int,
    config: Any,
    overheads: Sequence[int] | None = None,
) -> list[tuple[Plan, torch.Tensor]]:
    """Plan the InternVL images of a batch from their per-tile merged-token scores, with one vectorised selection
    for all of them (the adapter and the vLLM plugin share it).

    Args:
        tile_scores: per image ``(tiles, g*g)``: crops row-major, then the thumbnail (InternVL's tile order). A
            lone tile (grid 1 x 1) is the whole image: its own global view, compressed by the thumbnail rule.
        grids: per image ``(rows, cols)`` of crops.
        g: merged tokens per tile side.
        config: a :class:`~globalcom2.GlobalComConfig`.
        overheads: per image its layout tokens under ``max_image_tokens`` (:func:`internvl_image_ratio`;
            default InternVL's two markers).

    Returns:
        ``(plan, index)`` per image; ``index`` picks the kept tokens from the image's ``tiles * g*g`` features.
        Budget mode reads nothing from the device; reference mode reads the kept counts once.
    """
    cfg = config
    n_tok = g * g
    extra = [IMAGE_MARKERS] * len(grids) if overheads is None else list(overheads)
    crops = [rows * cols if num_tiles(rows, cols) > 1 else 0 for rows, cols in grids]
    ratios = [internvl_image_ratio(cfg, n + 1, n_tok, o) for n, o in zip(crops, extra, strict=True)]
    images = [
        internvl_selection_input(t, grid, g, r) for t, grid, r in zip(tile_scores, grids, ratios, strict=True)
    ]
    selections = select_images(images, **cfg.selection_options)
    kept = kept_crop_tokens(images, selections, cfg.mode)
    out = []
    for sel, (rows, cols), n, ratio, count, overhead in zip(
        selections, grids, crops, ratios, kept, extra, strict=True
    ):
        crop_index = true_indices(sel.crop_keep.reshape(-1), count)  # count known: no host synchronisation
        index = torch.cat([crop_index, n * n_tok + sel.thumbnail_order])
        plan = Plan(
            grid=(rows, cols) if n else (0, 0),
            thumbnail_mask=sel.thumbnail_keep.reshape(g, g),
            crops_mask=tiles_to_grid(sel.crop_keep.reshape(n, g, g), rows, cols)
            if n
            else sel.crop_keep.reshape(0, 0),
            crop_ratios=sel.crop_ratios,
            num_tokens=int(index.numel()),
            num_tokens_full=(n + 1) * n_tok,
            valid_box=(0, rows * g, 0, cols * g) if n else (0, 0, 0, 0),
            crop_keep_counts=sel.crop_keep_counts,
            crop_valid_counts=sel.crop_valid_counts,
            mode=cfg.mode,
            thumbnail_order=sel.thumbnail_order,
            ratio=ratio,
        )
        if cfg.mode == "budget" and plan.num_tokens != internvl_num_image_tokens(cfg, n + 1, n_tok, overhead):
            raise RuntimeError("GlobalCom²: budget-mode selection and count disagree")  # guards the invariant
        out.append((plan, index))
    return out


def plan_internvl_tiles(
    tile_scores: torch.Tensor, grid: tuple[int, int], g: int, config: Any, overhead: int = IMAGE_MARKERS
) -> tuple[Plan, torch.Tensor]:
    """Plan one InternVL image: :func:`plan_internvl_batch` on a batch of one."""
    return plan_internvl_batch([tile_scores], [grid], g, config, [overhead])[0]


@register_adapter
class InternVLAdapter(FamilyAdapter):
    """GlobalCom² for ``InternVLForConditionalGeneration`` + ``InternVLProcessor``."""

    family = "internvl"
    token_layout: ClassVar[str] = "crops + thumbnail; <img>, </img> not counted"
    model_class_name = "InternVLForConditionalGeneration"
    processor_class_name = "InternVLProcessor"
    wraps_calls = True  # forward/generate take the tile grids off the inputs
    supports_max_image_tokens = True
    #: ``(height, width, tile, min_patches, max_patches) -> (rows, cols)``: the image processor's crop grid
    tiling_rule: ClassVar[Callable[..., tuple[int, int]]] = staticmethod(tile_grid)  # type: ignore[assignment]
    #: the field of ``get_image_features``' output that the model reads (Llama 4: ``last_hidden_state``)
    feature_field: ClassVar[str] = "pooler_output"

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)
        vcfg = model.config.vision_config
        size, patch = vcfg.image_size, vcfg.patch_size
        self.tile_hw = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size),) * 2
        self.patch = int(patch[0]) if isinstance(patch, (list, tuple)) else int(patch)
        self.factor = int(round(1 / float(model.config.downsample_ratio)))
        self.patches_per_side = self.tile_hw[0] // self.patch
        self.g = self.patches_per_side // self.factor  # merged tokens per tile side
        self._warned = False

    def describe_tower(self, tower: Any) -> TowerInfo:
        return describe_internvl_tower(tower)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        cfg = self.model.config
        if self.tile_hw[0] != self.tile_hw[1]:
            raise ValueError(f"GlobalCom² needs square InternVL tiles, got image_size {self.tile_hw}")
        if abs(1 / self.factor - float(cfg.downsample_ratio)) > 1e-9 or self.patches_per_side % self.factor:
            raise ValueError(
                f"downsample_ratio={cfg.downsample_ratio} must be 1/k with k dividing the {self.patches_per_side} "
                "patches per tile side"
            )
        if cfg.vision_feature_select_strategy != "default" or self.tower.num_prefix_tokens != 1:
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with "
                f"{self.tower.num_prefix_tokens} prefix token(s) is not supported: GlobalCom² needs the [CLS] "
                "token dropped ('default') so that each tile has g*g patch features"
            )

    def needs_processor(self) -> bool:
        return True

    def processor_needed_because(self) -> str:
        return "the model never sees the tile grid, so the patched processor passes it on (`globalcom2_tile_grids`)"

    def check_processor(self) -> None:
        processor: Any = self.processor
        if int(processor.image_seq_length) != self.g * self.g:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image_seq_length {processor.image_seq_length} vs "
                f"{self.g}x{self.g} merged tokens per tile"
            )
        size = processor.image_processor.size
        ph, pw = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if (int(ph), int(pw)) != self.tile_hw:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: tile size {(ph, pw)} vs {self.tile_hw}"
            )

    # -- processor side ----------------------------------------------------------------------------------------
    def install_family(self, handle: GlobalComHandle) -> None:
        proc = self.processor
        handle.patch(proc, "_process_images", functools.partial(self._process_images, proc._process_images))

    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        self.patch_placeholder_counts(handle)

    def num_image_tokens_for_tiles(self, tiles: int) -> int:
        """``<IMG_CONTEXT>`` tokens of one image of ``tiles`` tiles in budget mode (a lone tile keeps int(N*R)):
        :meth:`num_image_tokens_for_grid` of any grid of that many crops (the count and the layout tokens depend
        on the tile count only)."""
        return self.num_image_tokens_for_grid((1, tiles - 1) if tiles > 1 else (1, 1))

    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of crops the processor makes for one image of ``height x width`` pixels ((1, 1): one tile)."""
        ip: Any = self.processor.image_processor
        crop = bool(ip.crop_to_patches) and int(ip.max_patches) > 1
        if not crop:
            return 1, 1
        return type(self).tiling_rule(height, width, self.tile_hw, int(ip.min_patches), int(ip.max_patches))

    def tiles_for_image(self, height: int, width: int) -> int:
        """Tiles the processor makes for one image of ``height x width`` pixels."""
        return num_tiles(*self.grid_for_image(height, width))

    def ratio_for_grid(self, grid: tuple[int, int]) -> float:
        """R of one image of this crop grid (:func:`internvl_image_ratio`, :meth:`layout_tokens` as the overhead)."""
        return internvl_image_ratio(self.config, num_tiles(*grid), self.g * self.g, self.layout_tokens(grid))

    def num_image_tokens_for_grid(self, grid: tuple[int, int]) -> int:
        """Placeholders of one image of this crop grid in budget mode (the layout tokens not included)."""
        return internvl_num_image_tokens(
            self.config, num_tiles(*grid), self.g * self.g, self.layout_tokens(grid)
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the LLM receives for one image of ``height x width`` pixels in budget mode."""
        return self.num_image_tokens_for_grid(self.grid_for_image(height, width))

    def ratio_for_image(self, height: int, width: int) -> float:
        return self.ratio_for_grid(self.grid_for_image(height, width))

    def _replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        p = self.processor
        count = self.num_image_tokens_for_tiles(int(image_inputs["num_patches"][image_idx]))
        return f"{p.start_image_token}{p.image_token * count}{p.end_image_token}"

    def _num_multimodal_tokens(self, original: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
        out = original(image_sizes=image_sizes, **kwargs)
        patches = getattr(out, "num_image_patches", None)
        if patches is not None:
            out.num_image_tokens = [
                IMAGE_MARKERS + self.num_image_tokens_for_tiles(int(t)) for t in patches
            ]  # +<img></img>
        return out

    def _process_images(self, original: Any, images: Any, **kwargs: Any) -> Any:
        processed, replacements = original(images, **kwargs)
        processed[GRID_KEY] = self.tile_grids(images, processed["num_patches"], kwargs)
        return processed, replacements

    def tile_grids(self, images: Any, num_patches: Any, images_kwargs: dict) -> list[list[int]]:
        """(rows, cols) of every image, by the image processor's own rule, checked against its tile counts."""
        ip = self.processor.image_processor

        def opt(name: str) -> Any:
            value = images_kwargs.get(name)
            return getattr(ip, name) if value is None else value

        counts = [int(n) for n in (num_patches.tolist() if hasattr(num_patches, "tolist") else num_patches)]
        return tile_grids_for(image_sizes_of(images), counts, opt, type(self).tiling_rule)

    # -- model side: the grids travel with the call, selection runs after get_image_features ----------------
    @contextmanager
    def call_context(self, handle: GlobalComHandle, kwargs: dict) -> Iterator[None]:
        grids = kwargs.pop(GRID_KEY, None)
        context = handle.state.context
        previous = context.get(GRID_KEY)
        if grids is not None:
            context[GRID_KEY] = grids
        try:
            yield
        finally:
            context[GRID_KEY] = previous

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return merge_pool(scores, self.factor)  # Eq. 1 summed over each pixel-shuffle group

    def pop_encode_inputs(self, kwargs: dict) -> dict:
        extra = {"grids": kwargs.pop(GRID_KEY, None), "return_dict": kwargs.pop("return_dict", None)}
        kwargs["return_dict"] = True
        return extra

    def after_encode(self, handle: GlobalComHandle, out: Any, extra: dict) -> Any:
        grids = extra["grids"]
        if grids is None:
            grids = handle.state.context.get(GRID_KEY)
        if grids is None:
            handle.publish([])
            if not self._warned:
                warnings.warn(
                    f"GlobalCom²: these {self.family} inputs carry no tile grids (videos, or images processed "
                    "before globalcom2.apply); they are left uncompressed",
                    stacklevel=3,
                )
                self._warned = True
        else:
            features = getattr(out, self.feature_field)
            setattr(out, self.feature_field, self._select(handle, features, self.take_scores(handle), grids))
        return out if extra["return_dict"] is not False else out.to_tuple()

    def _select(
        self, handle: GlobalComHandle, features: torch.Tensor, scores: torch.Tensor | None, grids: Any
    ) -> torch.Tensor:
        """Keep each image's selected tokens; ``(num_kept_tokens, 1, D)`` in LLM order."""
        grid_list, counts = self.tile_counts(features, grids)
        flat = features.reshape(-1, features.shape[-1])
        # scores None: a method that ranks nothing (pooling) plans from the grids alone
        per_image: list[Any] = (
            [None] * len(counts) if scores is None else list(scores.to(features.device).split(counts))
        )
        planned = self.plan_images(per_image, grid_list)
        handle.publish([plan for plan, _ in planned])
        return self.take_planned(flat, planned, counts).unsqueeze(1)

    def tile_counts(self, features: torch.Tensor, grids: Any) -> tuple[list[tuple[int, int]], list[int]]:
        """Every image's ``(rows, cols)`` and tile count, checked against the tiles the features hold."""
        grid_list = [(int(r), int(c)) for r, c in (grids.tolist() if hasattr(grids, "tolist") else grids)]
        counts = [num_tiles(r, c) for r, c in grid_list]
        if sum(counts) != features.shape[0]:
            raise NotImplementedError(
                f"GlobalCom²: the tile grids account for {sum(counts)} tiles but pixel_values holds "
                f"{features.shape[0]}; a call that mixes videos and images cannot be compressed on "
                f"{self.model_class_name} (pass them in separate calls)"
            )
        return grid_list, counts

    def take_planned(
        self, flat: torch.Tensor, planned: list[tuple[Plan, torch.Tensor]], counts: list[int]
    ) -> torch.Tensor:
        """The LLM's tokens of every image from the batch's ``(tiles*g*g, D)`` features: each plan's index picks
        from its image's tiles (``counts``: tiles per image); methods that average instead override this."""
        n_tok = self.g * self.g
        starts = itertools.accumulate(counts[:-1], initial=0)
        indices = [index + start * n_tok for (_, index), start in zip(planned, starts, strict=True)]
        # one row copy for the batch: index_select copies whole rows, ~5x faster on a CPU than flat[...] for the
        # wide rows here (Llama 4's are 4096 floats), same values
        return flat.index_select(0, torch.cat(indices))

    def plan_images(
        self, tile_scores: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[Plan, torch.Tensor]]:
        """Plan the images of one call from their per-tile merged-token scores (:func:`plan_internvl_batch`)."""
        return plan_internvl_batch(
            tile_scores, grids, self.g, self.config, [self.layout_tokens(g) for g in grids]
        )

    layout_label: ClassVar[str] = "<img> and </img> included"

    def layout_tokens(self, grid: tuple[int, int]) -> int:
        """Prompt tokens of one image of this crop grid besides its runs (they count towards ``max_image_tokens``):
        ``<img>`` and ``</img>`` whatever the grid."""
        return IMAGE_MARKERS

    # -- reference mode and the vision side --------------------------------------------------------------------
    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        if handle.state.context.get(GRID_KEY) is None:
            return None  # no tile grids: left uncompressed (see the module docstring)
        options = {k: kwargs.pop(k, None) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
        features = (
            self.inner.get_image_features(  # options left unset take the config's (families without them)
                pixel_values=kwargs.pop("pixel_values"),
                **{k: v for k, v in options.items() if v is not None},
                return_dict=True,
            )
        )
        return {"image": features}

    def plan_for_image(self, handle: GlobalComHandle, image: Any) -> Plan:
        inputs = self.processor(
            images=[image],
            text=[self.processor.image_token],
            return_tensors="pt",
            **self.plan_processor_kwargs,
        )
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.no_grad():
            self.inner.get_image_features(pixel_values, **{GRID_KEY: inputs[GRID_KEY]})
        return handle.state.plans[0]  # type: ignore[index]

    @staticmethod
    def overlay_geometry(model: Any, image: Any, plan: Plan) -> tuple[Any, int, tuple[int, int]]:
        """(image as the crops see it, tile size, canvas size) for :func:`globalcom2.viz.overlay.render_overlay`.

        InternVL stretches the image onto the crop grid (no padding), so the canvas is the stretched image.
        """
        from PIL import Image

        size = model.config.vision_config.image_size
        tile = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
        rows, cols = plan.grid
        if rows and cols:
            image = image.convert("RGB").resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
        return image, tile, (max(rows, 1) * tile, max(cols, 1) * tile)


ADAPTER = InternVLAdapter
