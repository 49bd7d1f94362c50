"""LLaVA-NeXT (anyres) adapter: the diff from :class:`~globalcom2.adapters.anyres.AnyresAdapter`.

What LLaVA-NeXT adds to the shared anyres behaviour:

- checks: the feature strategy must drop [CLS] (``"default"``), and the processor's patch and tile sizes must
  match the tower's;
- reference mode's token order, which reproduces the official implementation: the thumbnail in descending score
  order; each crop's kept token with index v in the crop's valid-token list (raster order of its unpadded block)
  written at tile position (v // g, v % g), as if the valid block were packed into the tile's top-left; then the
  padded ``(rows*g) x (cols*g)`` grid read in raster order with a newline after each of its rows*g rows (padded
  rows included). Budget mode uses the true raster order with a newline per valid row, as HF packs.
"""

from __future__ import annotations

from typing import Any

from .anyres import AnyresAdapter, anyres_grid
from .errors import IncompatibleProcessorError
from .registry import register_adapter


def image_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """Crop grid (rows, cols) that LLaVA-NeXT's anyres picks for an image of ``(height, width)``."""
    return anyres_grid(image_size, pinpoints, tile)


def _height_width(size: Any) -> tuple[int, int] | None:
    """``(height, width)`` of an image processor's ``crop_size`` (dict or SizeDict), None if it has none."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    h, w = (get("height"), get("width")) if size is not None else (None, None)
    return (int(h), int(w)) if h is not None and w is not None else None


@register_adapter
class LlavaNextAdapter(AnyresAdapter):
    """GlobalCom² for ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``."""

    family = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"
    processor_class_name = "LlavaNextProcessor"
    official_order = True  # reference mode: the official packed-slot token order

    def check_model(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported: GlobalCom² scores the patch tokens "
                "of each tile and needs the [CLS] token dropped ('default')"
            )

    def check_processor(self) -> None:
        super().check_processor()
        processor: Any = self.processor
        if processor.patch_size is not None and int(processor.patch_size) != self.patch_size:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: patch_size {processor.patch_size} vs {self.patch_size}"
            )
        crop = _height_width(getattr(processor.image_processor, "crop_size", None))
        if crop is not None and crop != (self.tile, self.tile):
            raise IncompatibleProcessorError(
                f"processor/model mismatch: the image processor cuts {crop[0]}x{crop[1]} px tiles, "
                f"the vision tower takes {self.tile}x{self.tile}"
            )


ADAPTER = LlavaNextAdapter
