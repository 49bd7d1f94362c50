"""Cohere2 Vision adapter: GlobalCom² (paper Eq. 2-7) on HF ``Cohere2VisionForConditionalGeneration``, written as the
diff from the Aya Vision adapter (same tiles + thumbnail, SigLIP, pixel shuffle in the projector, spans rewritten).

What differs from Aya Vision:

- **Tile grid.** Cohere2 Vision's image processor picks its own canvas (:func:`cohere2_tile_grid`): among every
  cols x rows grid with at most ``max_patches`` tiles (ordered by tile count), the one needing the least upscaling
  of the image, else the least downscaling (first among equals); ``min_patches`` is not used. The image is
  stretched onto it (no padding), cut into tiles row-major, and for more than one tile the whole image squashed to
  one tile is appended **last** (the thumbnail). So the selection is InternVL's
  (:func:`~globalcom2.adapters.internvl.plan_internvl_batch`) with this grid rule; a one-tile image keeps its top
  int(N*R) tokens.
- **Layout.** ``<|START_OF_IMG|>RUN<|IMG_LINE_BREAK|>RUN<|IMG_LINE_BREAK|>...RUN<|IMG_LINE_BREAK|><|END_OF_IMG|>``:
  a line break *after* every tile's run (Aya writes a ``TILE_k`` text marker before it). The line breaks stay; the
  model rewrites each span whole with the runs at their lengths, as on Aya. ``max_image_tokens`` counts
  ``2 + tiles`` markers.
- **Scores.** Eq. 7 on the projector's input, which here is the SigLIP2 tower's ``last_hidden_state`` (after its
  post-layernorm), summed over each 2 x 2 pixel-shuffle group (the projector's ``pixel_shuffle`` folds rows 2i..2i+1,
  columns 2j..2j+1 into token (i, j), raster order). Command-A-Vision: 512 px tiles of 16 px patches, 2 x 2: N = 256.
- **Processor.** ``Cohere2VisionProcessor`` reads its tokens from the tokenizer (``boi_token``, ``eoi_token``,
  ``image_token``, ``img_line_break_token``) and its tokens per tile from the image processor's ``patch_size``
  (tokens per tile side). The stock ``Cohere2VisionImageProcessor`` needs torchvision;
  :func:`globalcom2.processors.cohere2_vision_image_processor_pil_class` lays the pixels out the same way without it.

What is patched: as on Aya Vision (a pre-hook on ``multi_modal_projector``, ``get_image_features``,
``get_placeholder_mask``, the processor's ``_process_images``, ``replace_image_token`` and
``_get_num_multimodal_tokens``, ``forward``/``generate``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .aya_vision import AyaVisionAdapter
from .errors import IncompatibleProcessorError
from .registry import register_adapter


def cohere2_tile_grid(
    height: int, width: int, tile: tuple[int, int], min_patches: int, max_patches: int
) -> tuple[int, int]:
    """``(rows, cols)`` of tiles Cohere2 Vision's image processor picks for a ``height x width`` image (module
    docstring; ``min_patches`` is accepted and unused, as by the processor). Float64, as the processor computes."""
    grids = sorted(
        (
            (c, r)
            for c in range(1, max_patches + 1)
            for r in range(1, max_patches + 1)
            if c * r <= max_patches
        ),
        key=lambda g: g[0] * g[1],
    )
    sides = np.array(grids, dtype=np.float64) * int(tile[0])
    scales = np.min(sides / np.array([width, height], dtype=np.float64), axis=-1)
    if np.all(scales < 1):
        cols, rows = grids[int(np.argmax(scales))]
    else:
        cols, rows = grids[int(np.argmin(np.where(scales < 1.0, 10e9, scales)))]
    return rows, cols


@register_adapter
class Cohere2VisionAdapter(AyaVisionAdapter):
    """GlobalCom² for ``Cohere2VisionForConditionalGeneration`` + ``Cohere2VisionProcessor``."""

    family = "cohere2_vision"
    model_class_name = "Cohere2VisionForConditionalGeneration"
    processor_class_name = "Cohere2VisionProcessor"
    tiling_rule = staticmethod(cohere2_tile_grid)
    token_layout: ClassVar[str] = "crops + thumbnail; line breaks not counted"
    layout_label: ClassVar[str] = "<|START_OF_IMG|>, line breaks and <|END_OF_IMG|> included"

    def check_model(self) -> None:
        if self.factor < 1 or self.patches_per_side % self.factor:
            raise ValueError(
                f"downsample_factor={self.model.config.downsample_factor} must be a positive integer dividing the "
                f"{self.patches_per_side} patches per tile side"
            )

    def check_processor(self) -> None:
        proc: Any = self.processor
        size = proc.image_processor.size
        hw = (
            (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (size.height, size.width)
        )
        if int(proc.patch_size) != self.g or hw != self.tile_hw:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: {proc.patch_size}x{proc.patch_size} tokens per tile of {hw} px vs the "
                f"tower's {self.g}x{self.g} merged tokens per {self.tile_hw} px tile"
            )
        tok = proc.tokenizer
        for marker in (*self.span_markers(), self.placeholder_text, proc.img_line_break_token):
            if tok.convert_tokens_to_ids(marker) in (None, tok.unk_token_id):
                raise IncompatibleProcessorError(
                    f"the tokenizer has no single token {marker!r}; GlobalCom² locates each image span by it"
                )

    def span_markers(self) -> tuple[str, str]:
        proc: Any = self.processor
        return str(proc.boi_token), str(proc.eoi_token)

    @property
    def placeholder_text(self) -> str:
        return str(self.processor.image_token)  # type: ignore[union-attr]


ADAPTER = Cohere2VisionAdapter
