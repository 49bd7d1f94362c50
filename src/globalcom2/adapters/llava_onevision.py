"""LLaVA-OneVision adapter: GlobalCom² without [CLS] (paper Sec. 4.3, Eq. 7) on HF `LlavaOnevisionForConditionalGeneration`.

Written as the diff from the LLaVA-NeXT adapter (:mod:`globalcom2.adapters.llava_next`): same options, same
patching pattern, OneVision's own geometry.

**Importance (Eq. 7).** OneVision's SigLIP tower has no [CLS] token, so every token is scored by
s_i = -cos(x_i, g) with g the mean of the tokens of its own tile (thumbnail or crop), on the **selected vision
feature layer**: exactly the tensor the projector receives (``hidden_states[vision_feature_layer]`` after the
feature-select strategy; layer -1, the last SigLIP layer before ``post_layernorm``, in the released checkpoints).
That is the representation the LLM's tokens are made of, so "distinctive" is measured on what is kept; it is what
Sec. 4.3 describes ("vision tokens after vision encoding"); and it costs one pre-hook on the projector and no
extra tower pass. The thumbnail's scores give crop richness (Eq. 2-4, summed over each crop's thumbnail region)
and the global sub-maps (Eq. 5); each crop's own scores are its local scores. ``importance="auto"`` picks this
cosine score whenever the tower has no [CLS]; with a [CLS] tower (e.g. the DINOv2 stand-in) ``"cls"`` is available
and works as in LLaVA-NeXT.

**Geometry.** HF hands the LLM the thumbnail's g*g tokens (no newline), then the crop grid unpadded as in
LLaVA-NeXT and, when it holds more than 1.1² x N tiles' worth of tokens (``anyres_max_N``, N = 9), bilinearly
down-sampled to ``(int(h // s), int(w // s))``; each row of that grid is followed by the ``image_newline`` embedding.
GlobalCom² selects on that final token grid (:mod:`globalcom2.core.token_grid`): the crop score map is unpadded and
resized exactly like the features, every down-sampled token belongs to the crop of its nearest patch, and the
thumbnail map is resized to the same grid for the global sub-maps. The selection picks rows of HF's own packed
sequence, so unpadding and down-sampling stay HF's code.

**Budget mode** (default): ``num_tokens = int(g*g*R) + int(R*H*W) + H`` for a final crop grid of H x W tokens;
``LlavaOnevisionProcessor._get_number_of_features`` is patched on the instance (its other callers,
``replace_image_token`` and ``_get_num_multimodal_tokens``, follow). **Reference mode**: per-crop counts
int(N_j * r_j) and the thumbnail in descending score order (the official rules; there is no official OneVision
code, so crop tokens keep OneVision's raster layout with a newline per row); ``generate``/``forward`` shrink each
image's placeholder run as for LLaVA-NeXT.

**Left untouched:** video inputs (``pixel_values_videos`` -> ``get_video_features``: single frames pooled 2x2 by HF,
with no thumbnail/crop structure to guide; the scoring hooks only record inside ``get_image_features``), and the
images of multi-image prompts, which HF encodes as one base tile each (single-tile images are never compressed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import GlobalComConfig
from ..core.geometry import tiles_to_grid, valid_box
from ..core.planner import plan_single_tile
from ..core.token_grid import (
    GridPlan,
    anyres_max_shape,
    budget_counts,
    footprint,
    parse_anyres_max,
    resample_blocks,
    resize_map,
    select_on_grid,
)
from .base import GlobalComHandle
from .llava_next import LlavaNextAdapter, _pad_id, check_placeholders, shrink_placeholders


def placeholder_positions(inner: Any, token_id: int, input_ids, inputs_embeds) -> torch.Tensor:
    """Bool ``(batch, seq)``: where the image placeholders are (HF's rule when only embeddings are given)."""
    if input_ids is not None:
        return input_ids == token_id
    token = inner.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == token).all(-1)


def _hf():
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.image_processing_utils import select_best_resolution

    return LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, select_best_resolution


@dataclass(frozen=True)
class OneVisionGeometry:
    """Where one image's crop tokens sit (all in patch cells).

    Attributes:
        grid: ``(rows, cols)`` of crops chosen by the anyres pinpoints.
        g: patches per tile side.
        box: unpadded area ``(top, bottom, left, right)`` of the padded ``(rows*g) x (cols*g)`` grid.
        token_grid: ``(H, W)`` crop tokens the LLM receives (after OneVision's down-sampling, if any).
    """

    grid: tuple[int, int]
    g: int
    box: tuple[int, int, int, int]
    token_grid: tuple[int, int]

    def num_tokens(self, ratio: float | None, newline: bool = True) -> int:
        """Image tokens handed to the LLM: uncompressed (``ratio=None``) or in budget mode."""
        h, w = self.token_grid
        thumb, crops = (self.g**2, h * w) if ratio is None else budget_counts(self.g**2, h, w, ratio)
        return thumb + crops + (h if newline else 0)


def onevision_geometry(
    image_size: tuple[int, int], pinpoints: list, tile: int, g: int, max_tiles: int
) -> OneVisionGeometry:
    """OneVision's tiling of an image of ``(height, width)`` pixels (HF ``pack_image_features`` rules)."""
    *_, select_best_resolution = _hf()
    best_h, best_w = select_best_resolution(list(image_size), pinpoints)
    rows, cols = best_h // tile, best_w // tile
    box = valid_box(int(image_size[0]), int(image_size[1]), rows * g, cols * g)
    top, bottom, left, right = box
    return OneVisionGeometry((rows, cols), g, box, anyres_max_shape(bottom - top, right - left, g, max_tiles))


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """GlobalCom² for LLaVA-OneVision; instantiated by :func:`globalcom2.apply`."""

    family = "llava_onevision"
    model_class_name = "LlavaOnevisionForConditionalGeneration"

    @classmethod
    def is_supported(cls, model: Any) -> bool:
        return type(model).__name__ == cls.model_class_name and type(model) is _hf()[0]

    def __init__(self, model: Any, processor: Any, config: GlobalComConfig) -> None:
        super().__init__(model, processor, config)
        self.vision_aspect_ratio = model.config.vision_aspect_ratio
        self.max_tiles = parse_anyres_max(self.vision_aspect_ratio)
        self._capturing = 0

    # -- checks (run before anything is patched) ---------------------------------------------------------------
    def check(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        prefix = self.tower.num_prefix_tokens
        if (strategy, prefix) not in (("full", 0), ("default", 1)):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} with a {self.tower.name} tower ({prefix} prefix "
                "token(s)) does not give one feature per patch; OneVision needs 'full' for towers without [CLS] "
                "(SigLIP) and 'default' for towers with one [CLS]"
            )
        if self.config.mode == "budget" and self.processor is None:
            raise ValueError("mode='budget' needs the processor (it emits the compressed placeholder count)")
        if self.processor is None:
            return
        self.check_processor(_hf()[1], strategy)
        side = int(math.sqrt(self.processor.num_image_tokens or 0))
        if side != self.g:
            raise ValueError(
                f"processor/model mismatch: num_image_tokens={self.processor.num_image_tokens} gives {side} "
                f"patches per side, the vision tower {self.g}"
            )
        if self.processor.vision_aspect_ratio != self.vision_aspect_ratio:
            raise ValueError(
                "processor/model mismatch: vision_aspect_ratio "
                f"{self.processor.vision_aspect_ratio!r} vs {self.vision_aspect_ratio!r}"
            )

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
        get_features = self.inner.get_image_features
        handle.patch(self.inner, "get_image_features", self._capturing_call(handle, get_features))
        pack = self.inner.pack_image_features
        handle.patch(self.inner, "pack_image_features", functools.partial(self._pack_onevision, handle, pack))
        mask = self.inner.get_placeholder_mask
        handle.patch(
            self.inner, "get_placeholder_mask", functools.partial(self._placeholder_mask, handle, mask)
        )
        if self.config.mode == "budget":
            original = self.processor._get_number_of_features
            handle.patch(
                self.processor, "_get_number_of_features", functools.partial(self._num_features, original)
            )
        else:
            for name in ("forward", "generate"):
                original = getattr(self.model, name)
                # wraps() keeps the signature: generate() validates its kwargs against forward's parameters
                call = functools.wraps(original)(
                    functools.partial(self._shrinking_call, handle, original, name)
                )
                handle.patch(self.model, name, call)

    def _capturing_call(self, handle: GlobalComHandle, original):
        """``get_image_features`` with the scoring hooks switched on (video encoding never records scores)."""

        @functools.wraps(original)  # keeps the signature: generate() inspects it to pre-encode images
        def get_image_features(*args, **kwargs):
            handle._pending_scores.clear()
            self._capturing += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._capturing -= 1
                handle._pending_scores.clear()

        return get_image_features

    # -- scoring hooks ---------------------------------------------------------------------------------------
    def _cls_hook(self, handle: GlobalComHandle, module, args, kwargs) -> None:
        if self._capturing:  # only the image tower calls made by get_image_features, never video frames
            super()._cls_hook(handle, module, args, kwargs)

    def _cosine_hook(self, handle: GlobalComHandle, module, args) -> None:
        if self._capturing:
            super()._cosine_hook(handle, module, args)  # Eq. 7 per tile, (T, g*g)

    # -- counts ------------------------------------------------------------------------------------------------
    def geometry(self, height: int, width: int) -> OneVisionGeometry:
        """Tiling of one image of ``height x width`` pixels."""
        return onevision_geometry((height, width), self.pinpoints, self.tile, self.g, self.max_tiles)

    def _num_features(self, original, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Processor-side count in budget mode: HF's count with the thumbnail and crop terms swapped in."""
        g = int(math.sqrt(self.processor.num_image_tokens))
        geo = onevision_geometry((orig_height, orig_width), self.pinpoints, height, g, self.max_tiles)
        hf = original(orig_height, orig_width, height, width)
        return hf - geo.num_tokens(None) + geo.num_tokens(self.config.ratio)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the LLM receives for one (single-image prompt) image in budget mode."""
        return self.geometry(height, width).num_tokens(self.config.ratio)

    # -- selection (replaces LlavaOnevisionModel.pack_image_features) ------------------------------------------
    def _pack_onevision(
        self, handle: GlobalComHandle, original, image_features, image_sizes, image_newline=None,
        vision_aspect_ratio=None,
    ):  # fmt: skip
        aspect = vision_aspect_ratio or self.vision_aspect_ratio
        packed, _ = original(
            image_features, image_sizes, image_newline=image_newline, vision_aspect_ratio=aspect
        )
        if not handle._pending_scores:
            raise RuntimeError(
                "GlobalCom²: no token scores were captured for these image features; pack_image_features must "
                "be called from the patched get_image_features"
            )
        scores = torch.cat(handle._pending_scores, dim=0)
        handle._pending_scores.clear()
        max_tiles = parse_anyres_max(aspect)
        newline = image_newline is not None
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        )
        plans, out, lens, offset = [], [], [], 0
        for feats, seq, (h, w) in zip(image_features, packed, sizes, strict=True):
            num_tiles = feats.shape[0]
            tile_scores = scores[offset : offset + num_tiles].to(seq.device)
            offset += num_tiles
            if num_tiles == 1:  # an image of a multi-image prompt: one base tile, never compressed
                plan, index = plan_single_tile(self.g, device=seq.device)
                if not newline:
                    plan.num_tokens = plan.num_tokens_full = self.g * self.g
                    index = index[: self.g * self.g]
            else:
                geo = onevision_geometry((int(h), int(w)), self.pinpoints, self.tile, self.g, max_tiles)
                plan, index = self.plan_onevision(tile_scores, geo, newline=newline)
            if seq.shape[0] != plan.num_tokens_full:
                raise RuntimeError(
                    f"GlobalCom²: HF packed {seq.shape[0]} tokens for an image of {h}x{w}, the OneVision geometry "
                    f"gives {plan.num_tokens_full}; this transformers version packs differently"
                )
            out.append(seq[index])
            lens.append(int(index.numel()))
            plans.append(plan)
        if offset != scores.shape[0]:
            raise RuntimeError(f"GlobalCom²: {scores.shape[0]} tiles were scored but {offset} were packed")
        handle.plans = plans
        return out, torch.tensor(lens, dtype=torch.long, device=packed[0].device)

    def plan_onevision(
        self, tile_scores: torch.Tensor, geo: OneVisionGeometry, *, newline: bool = True
    ) -> tuple[GridPlan, torch.Tensor]:
        """Plan one image from its per-tile scores.

        Args:
            tile_scores: ``(1 + rows*cols, g*g)``: thumbnail first, then the crops row-major (HF's tile order).
            geo: the image's :class:`OneVisionGeometry`.

        Returns:
            ``(plan, index)``; ``index`` picks the kept tokens from HF's packed sequence
            ``[g*g thumbnail tokens, then H rows of W crop tokens (+ newline)]``.
        """
        cfg = self.config
        rows, cols = geo.grid
        g = geo.g
        top, bottom, left, right = geo.box
        height, width = geo.token_grid
        crop_map = tiles_to_grid(tile_scores[1:].float().reshape(rows * cols, g, g), rows, cols)
        local = resize_map(crop_map[top:bottom, left:right], (height, width))
        row_block, col_block, _, _ = resample_blocks(bottom - top, right - left, top, left, height, width, g)
        sel = select_on_grid(
            tile_scores[0], local, row_block, col_block, geo.grid, ratio=cfg.ratio, mode=cfg.mode,
            allocation=cfg.allocation, scoring=cfg.scoring, alpha=cfg.alpha, tau=cfg.tau,
        )  # fmt: skip
        device = local.device
        per_row = width + int(newline)
        crop_index = g * g + torch.arange(height * per_row, device=device).reshape(height, per_row)
        row_mask = torch.cat([sel.keep, torch.full((height, int(newline)), True, device=device)], dim=1)
        index = torch.cat([sel.thumbnail_order.to(device), crop_index[row_mask]])
        plan = GridPlan(
            grid=geo.grid,
            thumbnail_mask=sel.thumbnail_mask,
            crops_mask=footprint(sel.keep, geo.box, (rows * g, cols * g)),
            crop_ratios=sel.crop_ratios,
            num_tokens=int(index.numel()),
            num_tokens_full=geo.num_tokens(None, newline),
            valid_box=geo.box,
            crop_keep_counts=sel.crop_keep_counts,
            crop_valid_counts=sel.crop_valid_counts,
            mode=cfg.mode,
            thumbnail_order=sel.thumbnail_order,
            token_mask=sel.keep,
            token_grid=(height, width),
        )
        if cfg.mode == "budget" and plan.num_tokens != geo.num_tokens(cfg.ratio, newline):
            raise RuntimeError("GlobalCom²: budget-mode selection and count disagree")  # guards the invariant
        return plan, index

    # -- placeholder check (wraps LlavaOnevisionModel.get_placeholder_mask; videos pass straight through) -------
    def _placeholder_mask(self, handle: GlobalComHandle, original, input_ids, inputs_embeds=None,
                          image_features=None, video_features=None):  # fmt: skip
        if image_features is not None:
            check_placeholders(
                placeholder_positions(self.inner, self.model.config.image_token_id, input_ids, inputs_embeds),
                int(image_features.shape[0]),
                handle.plans,
                self.config,
            )
        return original(
            input_ids,
            inputs_embeds=inputs_embeds,
            image_features=image_features,
            video_features=video_features,
        )

    # -- reference mode: shrink placeholder runs to the plan's counts ------------------------------------------
    def _shrinking_call(self, handle: GlobalComHandle, original, name: str, *args, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if pixel_values is None or input_ids is None or kwargs.get("mm_encoder_outputs") is not None:
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        kwargs.pop("pixel_values")
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        encoder_outputs = {
            "image": self.inner.get_image_features(
                pixel_values,
                kwargs.pop("image_sizes"),
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                vision_aspect_ratio=kwargs.pop("vision_aspect_ratio", None),
                batch_num_images=kwargs.get("batch_num_images"),
                return_dict=True,
            )
        }
        plans = list(handle.plans)
        videos = kwargs.pop("pixel_values_videos", None)
        if videos is not None:  # HF refuses raw video pixels beside pre-computed image features
            encoder_outputs["video"] = self.inner.get_video_features(
                videos, vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True
            )
            kwargs.pop("image_sizes_videos", None)
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
        kwargs["mm_encoder_outputs"] = encoder_outputs
        out = original(*args, **kwargs)
        if name == "generate" and isinstance(out, torch.Tensor):
            out = torch.cat([input_ids, out[:, shrunk["input_ids"].shape[1] :]], dim=1)
        return out


ADAPTER = LlavaOnevisionAdapter
