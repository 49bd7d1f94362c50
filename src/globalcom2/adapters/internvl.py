"""InternVL adapter: GlobalCom² (paper Eq. 1-6) on HF `InternVLForConditionalGeneration` (dynamic tiles).

InternVL tiles an image into a rows x cols grid of crops chosen by aspect ratio (no padding: the image is
stretched to the grid), appends the **thumbnail last**, and hands the LLM ``(g/2)**2`` tokens per tile after
``pixel_shuffle`` merges every 2 x 2 patches into one token (256 for 448 px tiles of 14 px patches).

**Importance.** InternViT has a [CLS] token: its row of the *last* layer's attention scores the patches (Eq. 1,
logits or softmax as for LLaVA-NeXT), computed from that layer's input by a forward pre-hook (its
``layernorm_before``, ``q_proj``/``k_proj`` and, when the checkpoint has them, ``q_norm``/``k_norm``). The patch
scores are **summed over each 2 x 2 pixel-shuffle group** (:func:`~globalcom2.core.token_grid.merge_pool`): a
merged token carries the share of the [CLS] row of the four patches it is made of, so crop richness S_j (Eq. 2)
is the same sum over the crop's patches as without merging, and inside a tile the ranking equals the mean's.
``importance="cosine"`` scores Eq. 7 on the merged tokens (the projector's input) instead.

**Selection.** On the merged grid every crop is a full g' x g' block (no unpadding): crop richness from the
thumbnail's regions, r_j (Eq. 3-4), holistic scores with the thumbnail map resized to the whole crop grid (Eq. 5),
top tokens per crop (Eq. 6) -- :func:`~globalcom2.core.token_grid.select_on_grid`. Kept tokens reach the LLM in
InternVL's order: crop after crop (raster inside each), then the thumbnail. Budget mode keeps
``int(N*R) + int(R*n*N)`` tokens for n crops of N tokens (a function of the tile count only); reference mode
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

What is patched (recorded on the handle, undone by ``remove()``): a pre-hook on the tower's last layer (or on the
projector for cosine), ``InternVLModel.get_image_features``, ``InternVLProcessor._process_images`` (grids),
``replace_image_token`` and ``_get_num_multimodal_tokens`` (budget counts), and ``forward``/``generate``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from ..config import GlobalComConfig
from ..core.geometry import grid_to_tiles, tiles_to_grid
from ..core.plan import Plan
from ..core.scores import cls_attention_scores, cosine_scores
from ..core.token_grid import budget_counts, merge_pool, select_on_grid
from .base import GlobalComHandle
from .llava_next import _pad_id, check_placeholders, shrink_placeholders
from .llava_onevision import placeholder_positions
from .towers import TowerInfo, describe_tower

#: Processor output / model input carrying each image's crop grid (rows, cols).
GRID_KEY = "globalcom2_tile_grids"


def _hf():
    from transformers import InternVLForConditionalGeneration, InternVLProcessor

    return InternVLForConditionalGeneration, InternVLProcessor


def describe_internvl_tower(tower: Any) -> TowerInfo:
    """Scoring pieces of InternViT (``InternVLVisionModel``); other towers as in LLaVA-NeXT."""
    if type(tower).__name__ != "InternVLVisionModel":
        return describe_tower(tower)
    layer = tower.encoder.layer[-1]
    att = layer.attention

    def q_proj(x: torch.Tensor) -> torch.Tensor:
        return att.q_norm(att.q_proj(x))  # q/k norms act on the projected vectors (Identity when absent)

    def k_proj(x: torch.Tensor) -> torch.Tensor:
        return att.k_norm(att.k_proj(x))

    return TowerInfo("internvit", layer, layer.layernorm_before, q_proj, k_proj, int(att.num_heads), 1, True)


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


class InternVLAdapter:
    """GlobalCom² for InternVL; instantiated by :func:`globalcom2.apply`."""

    family = "internvl"
    model_class_name = "InternVLForConditionalGeneration"

    @classmethod
    def is_supported(cls, model: Any) -> bool:
        return type(model).__name__ == cls.model_class_name and type(model) is _hf()[0]

    def __init__(self, model: Any, processor: Any, config: GlobalComConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.inner = model.model  # InternVLModel
        vcfg = model.config.vision_config
        size, patch = vcfg.image_size, vcfg.patch_size
        self.tile_hw = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size),) * 2
        self.patch = int(patch[0]) if isinstance(patch, (list, tuple)) else int(patch)
        self.factor = int(round(1 / float(model.config.downsample_ratio)))
        self.patches_per_side = self.tile_hw[0] // self.patch
        self.g = self.patches_per_side // self.factor  # merged tokens per tile side
        self.tower = describe_internvl_tower(self.inner.vision_tower)
        self.importance = self._resolve_importance()
        self._capturing = 0
        self._grids: Any = None
        self._warned = False

    # -- checks (run before anything is patched) ---------------------------------------------------------------
    def _resolve_importance(self) -> str:
        imp = self.config.importance
        if imp == "auto":
            return "cls" if self.tower.has_cls else "cosine"
        if imp == "cls" and not self.tower.has_cls:
            raise ValueError(
                f"`importance='cls'` needs a vision tower with a [CLS] token; {self.tower.name} has none "
                "(use importance='cosine' or 'auto')"
            )
        return imp

    def check(self) -> None:
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
        if self.processor is None:
            raise ValueError(
                "InternVL needs the processor in both modes: the model never sees the tile grid, so the patched "
                "processor passes it on (`globalcom2_tile_grids`)"
            )
        _, proc_cls = _hf()
        if not isinstance(self.processor, proc_cls):
            raise TypeError(
                f"processor must be a InternVLProcessor for {type(self.model).__name__}, "
                f"got {type(self.processor).__name__}"
            )
        if int(self.processor.image_seq_length) != self.g * self.g:
            raise ValueError(
                f"processor/model mismatch: image_seq_length {self.processor.image_seq_length} vs "
                f"{self.g}x{self.g} merged tokens per tile"
            )
        size = self.processor.image_processor.size
        ph, pw = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if (int(ph), int(pw)) != self.tile_hw:
            raise ValueError(f"processor/model mismatch: tile size {(ph, pw)} vs {self.tile_hw}")
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is not None and int(token_id) != int(cfg.image_token_id):
            raise ValueError(f"processor/model mismatch: image_token_id {token_id} vs {cfg.image_token_id}")

    # -- installation ------------------------------------------------------------------------------------------
    def install(self, handle: GlobalComHandle) -> None:
        if self.importance == "cls":
            hook = self.tower.last_layer.register_forward_pre_hook(
                functools.partial(self._cls_hook, handle), with_kwargs=True
            )
        else:
            hook = self.inner.multi_modal_projector.register_forward_pre_hook(
                functools.partial(self._cosine_hook, handle)
            )
        handle.add_hook(hook)
        handle.patch(
            self.inner, "get_image_features", self._features_call(handle, self.inner.get_image_features)
        )
        mask = self.inner.get_placeholder_mask
        handle.patch(
            self.inner, "get_placeholder_mask", functools.partial(self._placeholder_mask, handle, mask)
        )
        proc = self.processor
        handle.patch(proc, "_process_images", functools.partial(self._process_images, proc._process_images))
        if self.config.mode == "budget":
            handle.patch(proc, "replace_image_token", self._replace_image_token)
            handle.patch(
                proc,
                "_get_num_multimodal_tokens",
                functools.partial(self._num_multimodal_tokens, proc._get_num_multimodal_tokens),
            )
        for name in ("forward", "generate"):
            handle.patch(self.model, name, self._model_call(handle, getattr(self.model, name), name))

    # -- processor side ----------------------------------------------------------------------------------------
    def num_image_tokens_for_tiles(self, tiles: int) -> int:
        """``<IMG_CONTEXT>`` tokens of one image of ``tiles`` tiles in budget mode (a lone tile keeps int(N*R))."""
        n = self.g * self.g
        thumb, crops = budget_counts(n, max(tiles - 1, 0), n, self.config.ratio)
        return thumb + (crops if tiles > 1 else 0)

    def _replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        p = self.processor
        count = self.num_image_tokens_for_tiles(int(image_inputs["num_patches"][image_idx]))
        return f"{p.start_image_token}{p.image_token * count}{p.end_image_token}"

    def _num_multimodal_tokens(self, original, image_sizes=None, **kwargs):
        out = original(image_sizes=image_sizes, **kwargs)
        patches = getattr(out, "num_image_patches", None)
        if patches is not None:
            out.num_image_tokens = [
                2 + self.num_image_tokens_for_tiles(int(t)) for t in patches
            ]  # +<img></img>
        return out

    def _process_images(self, original, images, **kwargs):
        processed, replacements = original(images, **kwargs)
        processed[GRID_KEY] = self.tile_grids(images, processed["num_patches"], kwargs)
        return processed, replacements

    def tile_grids(self, images: Any, num_patches: Any, images_kwargs: dict) -> list[list[int]]:
        """(rows, cols) of every image, by the image processor's own rule, checked against its tile counts."""
        from transformers.image_utils import (
            get_image_size,
            infer_channel_dimension_format,
            make_flat_list_of_images,
            to_numpy_array,
        )

        ip = self.processor.image_processor

        def opt(name: str):
            value = images_kwargs.get(name)
            return getattr(ip, name) if value is None else value

        size = opt("size")
        tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        crop = bool(opt("crop_to_patches")) and int(opt("max_patches")) > 1
        grids = []
        counts = [int(n) for n in (num_patches.tolist() if hasattr(num_patches, "tolist") else num_patches)]
        flat: list[Any] = list(make_flat_list_of_images(images))  # type: ignore[arg-type]
        for image, count in zip(flat, counts, strict=True):
            if hasattr(image, "size") and hasattr(image, "mode"):  # PIL
                height, width = image.height, image.width
            else:
                arr = to_numpy_array(image)
                height, width = get_image_size(arr, infer_channel_dimension_format(arr))
            rows, cols = (
                tile_grid(height, width, tile, int(opt("min_patches")), int(opt("max_patches")))
                if crop
                else (1, 1)
            )
            if num_tiles(rows, cols) != count:
                raise RuntimeError(
                    f"GlobalCom²: the image processor made {count} tiles for a {height}x{width} image but its "
                    f"tiling rule gives a {rows}x{cols} grid; cannot recover the tile grid"
                )
            grids.append([rows, cols])
        return grids

    # -- model side ------------------------------------------------------------------------------------------
    def _model_call(self, handle: GlobalComHandle, original, name: str):
        """``forward``/``generate`` that take the tile grids off the inputs (and shrink in reference mode)."""

        @functools.wraps(original)  # keeps the signature: generate() inspects forward's parameters
        def call(*args, **kwargs):
            grids = kwargs.pop(GRID_KEY, None)
            previous = self._grids
            if grids is not None:
                self._grids = grids
            try:
                if self.config.mode == "reference":
                    return self._shrinking_call(handle, original, name, *args, **kwargs)
                return original(*args, **kwargs)
            finally:
                self._grids = previous

        return call

    def _features_call(self, handle: GlobalComHandle, original):
        @functools.wraps(original)  # keeps the signature: generate() inspects it to pre-encode images
        def get_image_features(*args, **kwargs):
            grids = kwargs.pop(GRID_KEY, None)
            grids = self._grids if grids is None else grids
            return_dict = kwargs.pop("return_dict", None)
            handle._pending_scores.clear()
            self._capturing += 1
            try:
                out = original(*args, return_dict=True, **kwargs)
            finally:
                self._capturing -= 1
            scores = list(handle._pending_scores)
            handle._pending_scores.clear()
            if grids is None:
                handle.plans = []
                if not self._warned:
                    warnings.warn(
                        "GlobalCom²: these InternVL inputs carry no tile grids (videos, or images processed before "
                        "globalcom2.apply); they are left uncompressed",
                        stacklevel=2,
                    )
                    self._warned = True
            elif not scores:
                raise RuntimeError("GlobalCom²: no token scores were captured while encoding these tiles")
            else:
                out.pooler_output = self._select(handle, out.pooler_output, torch.cat(scores), grids)
            return out if return_dict is not False else out.to_tuple()

        return get_image_features

    @torch.no_grad()
    def _cls_hook(self, handle: GlobalComHandle, module, args, kwargs) -> None:
        if not self._capturing:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        t = self.tower
        patch_scores = cls_attention_scores(
            hidden, norm=t.norm, q_proj=t.q_proj, k_proj=t.k_proj, num_heads=t.num_heads,
            kind=self.config.score, num_prefix_tokens=t.num_prefix_tokens,
        )  # fmt: skip
        handle._pending_scores[:] = [merge_pool(patch_scores, self.factor)]  # Eq. 1 pooled to merged tokens

    @torch.no_grad()
    def _cosine_hook(self, handle: GlobalComHandle, module, args) -> None:
        if self._capturing:
            handle._pending_scores[:] = [cosine_scores(args[0])]  # Eq. 7 on the merged tokens

    def _select(
        self, handle: GlobalComHandle, features: torch.Tensor, scores: torch.Tensor, grids
    ) -> torch.Tensor:
        """Keep each image's selected tokens; ``(num_kept_tokens, 1, D)`` in LLM order."""
        grid_list = [
            tuple(int(v) for v in row) for row in (grids.tolist() if hasattr(grids, "tolist") else grids)
        ]
        counts = [num_tiles(r, c) for r, c in grid_list]
        if sum(counts) != features.shape[0]:
            raise NotImplementedError(
                f"GlobalCom²: the tile grids account for {sum(counts)} tiles but pixel_values holds "
                f"{features.shape[0]}; a call that mixes videos and images cannot be compressed on InternVL "
                "(pass them in separate calls)"
            )
        flat = features.reshape(-1, features.shape[-1])
        n = self.g * self.g
        plans, indices, offset = [], [], 0
        for (rows, cols), count in zip(grid_list, counts, strict=True):
            plan, index = self.plan_tiles(scores[offset : offset + count].to(features.device), (rows, cols))
            indices.append(index + offset * n)
            plans.append(plan)
            offset += count
        handle.plans = plans
        return flat[torch.cat(indices)].unsqueeze(1)

    def plan_tiles(self, tile_scores: torch.Tensor, grid: tuple[int, int]) -> tuple[Plan, torch.Tensor]:
        """Plan one image from its per-tile merged-token scores.

        Args:
            tile_scores: ``(tiles, g'*g')``: crops row-major, then the thumbnail (InternVL's tile order).
            grid: ``(rows, cols)`` of crops.

        Returns:
            ``(plan, index)``; ``index`` picks the kept tokens from the image's ``tiles * g'*g'`` features.
        """
        cfg = self.config
        g, n_tok = self.g, self.g * self.g
        rows, cols = grid
        device = tile_scores.device
        if num_tiles(rows, cols) == 1:
            # The lone tile is the whole image (InternVL adds no thumbnail then): the global view, compressed by
            # the thumbnail rule (Eq. 1-2): its top int(N*R) tokens.
            keep_n, _ = budget_counts(n_tok, 0, 0, cfg.ratio)
            order = torch.sort(tile_scores[0].float(), descending=True, stable=True).indices[:keep_n]
            mask = torch.zeros(n_tok, dtype=torch.bool, device=device)
            mask[order] = True
            order = order if cfg.mode == "reference" else mask.nonzero().reshape(-1)
            plan = Plan(
                grid=(0, 0), thumbnail_mask=mask.reshape(g, g),
                crops_mask=torch.zeros(0, 0, dtype=torch.bool, device=device),
                crop_ratios=torch.zeros(0, device=device), num_tokens=int(order.numel()), num_tokens_full=n_tok,
                thumbnail_order=order, mode=cfg.mode,
            )  # fmt: skip
            return plan, order
        n = rows * cols
        local = tiles_to_grid(tile_scores[:n].float().reshape(n, g, g), rows, cols)
        blocks_r = torch.arange(rows * g, device=device) // g
        blocks_c = torch.arange(cols * g, device=device) // g
        _, crop_total = budget_counts(n_tok, n, n_tok, cfg.ratio)
        sel = select_on_grid(
            tile_scores[n], local, blocks_r, blocks_c, grid, ratio=cfg.ratio, mode=cfg.mode,
            allocation=cfg.allocation, scoring=cfg.scoring, alpha=cfg.alpha, tau=cfg.tau, crop_budget=crop_total,
        )  # fmt: skip
        keep_tiles = grid_to_tiles(sel.keep, rows, cols).reshape(n, n_tok)
        crop_index = torch.arange(n * n_tok, device=device).reshape(n, n_tok)[keep_tiles]
        index = torch.cat([crop_index, n * n_tok + sel.thumbnail_order.to(device)])
        plan = Plan(
            grid=grid,
            thumbnail_mask=sel.thumbnail_mask,
            crops_mask=sel.keep,
            crop_ratios=sel.crop_ratios,
            num_tokens=int(index.numel()),
            num_tokens_full=(n + 1) * n_tok,
            valid_box=(0, rows * g, 0, cols * g),
            crop_keep_counts=sel.crop_keep_counts,
            crop_valid_counts=sel.crop_valid_counts,
            mode=cfg.mode,
            thumbnail_order=sel.thumbnail_order,
        )
        if cfg.mode == "budget" and plan.num_tokens != self.num_image_tokens_for_tiles(n + 1):
            raise RuntimeError("GlobalCom²: budget-mode selection and count disagree")  # guards the invariant
        return plan, index

    def _placeholder_mask(self, handle: GlobalComHandle, original, input_ids, inputs_embeds=None,
                          image_features=None):  # fmt: skip
        """HF's mask, after checking that every image's placeholder run has its plan's length (clear errors)."""
        if image_features is not None:
            positions = placeholder_positions(
                self.inner, self.model.config.image_token_id, input_ids, inputs_embeds
            )
            rows = image_features.numel() // image_features.shape[-1]
            check_placeholders(positions, rows, handle.plans, self.config)
        return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)

    # -- reference mode: shrink placeholder runs to the plan's counts ------------------------------------------
    def _shrinking_call(self, handle: GlobalComHandle, original, name: str, *args, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if pixel_values is None or input_ids is None or kwargs.get("mm_encoder_outputs") is not None:
            return original(*args, **kwargs)
        if self._grids is None:  # nothing to compress (see the module docstring)
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        kwargs.pop("pixel_values")
        features = self.inner.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=kwargs.pop("vision_feature_layer", None),
            vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
            return_dict=True,
        )
        plans = list(handle.plans)
        shrunk = shrink_placeholders(
            input_ids,
            image_token_id=self.model.config.image_token_id,
            full_counts=[p.num_tokens_full for p in plans],
            new_counts=[p.num_tokens for p in plans],
            pad_token_id=_pad_id(self.model, self.processor),
            extra={
                k: kwargs[k]
                for k in ("attention_mask", "labels", "token_type_ids")
                if kwargs.get(k) is not None
            },
        )
        kwargs.update(shrunk)
        kwargs["mm_encoder_outputs"] = {"image": features}
        out = original(*args, **kwargs)
        if name == "generate" and isinstance(out, torch.Tensor):
            out = torch.cat([input_ids, out[:, shrunk["input_ids"].shape[1] :]], dim=1)
        return out

    # -- workflows (plans without the LLM, overlays) ---------------------------------------------------------
    def plan_for_image(self, handle: GlobalComHandle, image: Any) -> Plan:
        """Run the vision side only for one image and return its `Plan`."""
        inputs = self.processor(images=[image], text=[self.processor.image_token], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.no_grad():
            self.inner.get_image_features(pixel_values, **{GRID_KEY: inputs[GRID_KEY]})
        return handle.plans[0]

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
