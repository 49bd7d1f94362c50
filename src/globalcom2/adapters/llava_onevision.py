"""LLaVA-OneVision adapter: the diff from :class:`~globalcom2.adapters.anyres.AnyresAdapter` (paper Sec. 4.3).

**Importance (Eq. 7).** OneVision's SigLIP tower has no [CLS] token, so ``importance="auto"`` scores every token by
s_i = -cos(x_i, g), g the mean of its own tile's tokens, on the tensor the projector receives (the selected feature
layer): the representation the LLM's tokens are made of, at the cost of one pre-hook and no extra tower pass. With
a [CLS] tower (e.g. the DINOv2 stand-in) ``"cls"`` works as in LLaVA-NeXT.

**Geometry.** When the unpadded ``h x w`` crop grid holds more than 1.1² x N tiles' worth of tokens
(``anyres_max_N``, N = 9), HF bilinearly down-samples it to ``(int(h // s), int(w // s))`` with
``s = sqrt(h*w / (N*g*g))`` (:func:`anyres_max_shape`). GlobalCom² selects on that final grid: the crop score map
is resized the same way, every down-sampled token belongs to the crop of the patch nearest to its sample point
(:func:`~globalcom2.adapters.anyres.resample_blocks`), and the thumbnail map is resized to the same grid for the sub-maps. The plan's
``token_mask`` records the kept tokens on that grid; ``crops_mask`` shows them on the patch grid.

**Reference mode**: per-crop counts int(N_j * r_j) and the thumbnail in descending score order (the official
rules; there is no official OneVision code, so crop tokens keep OneVision's raster layout with a newline per row).

**Left untouched:** video inputs (the scoring hooks only record inside ``get_image_features``) and the images of
multi-image prompts, which HF encodes as one base tile each (single tiles are never compressed).
"""

from __future__ import annotations

import math
from typing import Any

from .anyres import AnyresAdapter, Box
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError
from .registry import register_adapter


def parse_anyres_max(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9 (the tile budget of OneVision's down-sampling rule)."""
    prefix = "anyres_max_"
    rest = vision_aspect_ratio[len(prefix) :] if vision_aspect_ratio.startswith(prefix) else ""
    if not rest.isdigit() or int(rest) <= 0:
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(rest)


def anyres_max_shape(height: int, width: int, g: int, max_tiles: int) -> tuple[int, int]:
    """Crop token grid after OneVision's down-sampling of an unpadded ``height x width`` patch grid."""
    scale = math.sqrt(height * width / (max_tiles * g**2))
    if scale > 1.1:
        return int(height // scale), int(width // scale)
    return height, width


@register_adapter
class LlavaOnevisionAdapter(AnyresAdapter):
    """GlobalCom² for ``LlavaOnevisionForConditionalGeneration`` + ``LlavaOnevisionProcessor``."""

    family = "llava_onevision"
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    processor_class_name = "LlavaOnevisionProcessor"

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)
        self.vision_aspect_ratio = model.config.vision_aspect_ratio
        self.max_tiles = parse_anyres_max(self.vision_aspect_ratio)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        prefix = self.tower.num_prefix_tokens
        if (strategy, prefix) not in (("full", 0), ("default", 1)):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} with a {self.tower.name} tower ({prefix} prefix "
                "token(s)) does not give one feature per patch; OneVision needs 'full' for towers without [CLS] "
                "(SigLIP) and 'default' for towers with one [CLS]"
            )

    def check_processor(self) -> None:
        super().check_processor()
        processor: Any = self.processor
        side = int(math.sqrt(processor.num_image_tokens or 0))
        if side != self.g:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: num_image_tokens={processor.num_image_tokens} gives {side} "
                f"patches per side, the vision tower {self.g}"
            )
        if processor.vision_aspect_ratio != self.vision_aspect_ratio:
            raise IncompatibleProcessorError(
                "processor/model mismatch: vision_aspect_ratio "
                f"{processor.vision_aspect_ratio!r} vs {self.vision_aspect_ratio!r}"
            )

    # -- geometry --------------------------------------------------------------------------------------------
    def processor_patch_size(self) -> int:
        # The processor knows tokens per tile, not the patch size: g = sqrt(num_image_tokens).
        return self.tile // int(math.sqrt(self.processor.num_image_tokens))

    def token_grid(self, box: Box, g: int, max_tiles: int | None = None, **options: Any) -> tuple[int, int]:
        top, bottom, left, right = box
        return anyres_max_shape(
            bottom - top, right - left, g, self.max_tiles if max_tiles is None else max_tiles
        )

    def geometry_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        aspect = arguments.get("vision_aspect_ratio") or self.vision_aspect_ratio
        return {"max_tiles": parse_anyres_max(aspect)}

    # -- reference mode ----------------------------------------------------------------------------------------
    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        outputs = {
            "image": self.inner.get_image_features(
                kwargs.pop("pixel_values"),
                kwargs.pop("image_sizes"),
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                vision_aspect_ratio=kwargs.pop("vision_aspect_ratio", None),
                batch_num_images=kwargs.get("batch_num_images"),
                return_dict=True,
            )
        }
        videos = kwargs.pop("pixel_values_videos", None)
        if videos is not None:  # HF refuses raw video pixels beside pre-computed image features
            outputs["video"] = self.inner.get_video_features(
                videos, vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True
            )
            kwargs.pop("image_sizes_videos", None)
        return outputs


ADAPTER = LlavaOnevisionAdapter
