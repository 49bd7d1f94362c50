"""Image tokens per image of the real checkpoints' geometries: uncompressed, at a ratio R, under a budget T.

Pure geometry (no weights): the same functions the processors' patched counts and the vLLM plugin call
(:func:`~globalcom2.adapters.anyres.anyres_geometry` + :meth:`~globalcom2.adapters.anyres.AnyresGeometry.num_budget_tokens`,
:func:`~globalcom2.adapters.internvl.internvl_num_image_tokens`), so the table in docs/max_image_tokens.md is this
module's output (``python scripts/budget_table.py``), not typed in. Counts include every token the image occupies in
the prompt: LLaVA's newline per crop row, InternVL's ``<img>``/``</img>``, Idefics3's markers and newlines
(:func:`~globalcom2.adapters.idefics3.idefics3_layout_tokens`, ``"\\n\\n"`` as one token) on the crop grid of HF's
own image processor; Gemma 3's ``<start_of_image>``/``<end_of_image>`` per run (its sentences and newlines not
counted: they depend on its tokenizer).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ..adapters.anyres import AnyresGeometry, Box, anyres_geometry
from ..adapters.idefics3 import idefics3_layout_tokens
from ..adapters.internvl import (
    IMAGE_MARKERS,
    internvl_image_ratio,
    internvl_num_image_tokens,
    num_tiles,
    tile_grid,
)
from ..adapters.llava_onevision import anyres_max_shape
from ..bench.flops import LLAVA_NEXT_PINPOINTS
from ..config import GlobalComConfig

#: ``image_grid_pinpoints`` of llava-hf/llava-onevision-qwen2-*-ov-hf: 384 px tiles, 1x1 up to 6x6.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
#: (height, width) of the example images.
SIZES: tuple[tuple[int, int], ...] = (
    (336, 336),
    (480, 640),
    (720, 1280),
    (1080, 1920),
    (1024, 1024),
    (336, 1008),
)
FAMILIES = (
    "LLaVA-NeXT-7B",
    "LLaVA-OneVision-7B",
    "InternVL3-8B",
    "Idefics3-8B",
    "SmolVLM-2B",
    "SmolVLM-256M",
    "Gemma-3-4B",
    "Gemma-3-4B pan-and-scan",
)
#: Idefics3 / SmolVLM: (image processor class, crop side ``max_image_size``, tokens per crop ``image_seq_len``);
#: images are resized to a longest edge of 4 crops before the split, as in the released processors.
IDEFICS3_GEOMETRIES = {
    "Idefics3-8B": ("Idefics3ImageProcessorPil", 364, 169),  # SigLIP 364/14, 2 x 2 shuffle
    "SmolVLM-2B": ("SmolVLMImageProcessorPil", 384, 81),  # SigLIP 384/14, 3 x 3 shuffle
    "SmolVLM-256M": ("SmolVLMImageProcessorPil", 512, 64),  # SigLIP 512/16, 4 x 4 shuffle (also 500M)
}


@dataclass(frozen=True)
class Cell:
    tokens: int
    ratio: float


def _onevision_grid(box: Box, g: int) -> tuple[int, int]:
    return anyres_max_shape(box[1] - box[0], box[3] - box[2], g, 9)  # vision_aspect_ratio "anyres_max_9"


def image_counts(family: str, size: tuple[int, int], config: GlobalComConfig | None) -> Cell:
    """Tokens one ``(height, width)`` image occupies in the prompt (``config=None``: uncompressed) and its R."""
    if family == "InternVL3-8B":  # 448 px tiles, 256 tokens each, 1..12 crops
        tiles = num_tiles(*tile_grid(size[0], size[1], (448, 448), 1, 12))
        if config is None:
            return Cell(IMAGE_MARKERS + tiles * 256, 1.0)
        return Cell(
            IMAGE_MARKERS + internvl_num_image_tokens(config, tiles, 256),
            internvl_image_ratio(config, tiles, 256),
        )
    if family in IDEFICS3_GEOMETRIES:
        return _idefics3_counts(family, size, config)
    if family.startswith("Gemma-3"):
        return _gemma3_counts(size, config, pan_and_scan=family.endswith("pan-and-scan"))
    geo: AnyresGeometry
    if family == "LLaVA-NeXT-7B":  # CLIP-336/14: g = 24
        geo = anyres_geometry(size, LLAVA_NEXT_PINPOINTS, 336, 24)
    elif family == "LLaVA-OneVision-7B":  # SigLIP-384/14: g = 27
        geo = anyres_geometry(size, ONEVISION_PINPOINTS, 384, 27, _onevision_grid)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if config is None:
        return Cell(geo.num_tokens(None), 1.0)
    return Cell(geo.num_budget_tokens(config), geo.image_ratio(config))


@functools.cache
def _idefics3_grid(family: str, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) HF's image processor splits the image into ((0, 0): the global image alone)."""
    import transformers

    name, crop, _ = IDEFICS3_GEOMETRIES[family]
    processor = getattr(transformers, name)(
        do_image_splitting=True, max_image_size={"longest_edge": crop}, size={"longest_edge": 4 * crop}
    )
    _, rows, cols = processor.get_number_of_image_patches(size[0], size[1], {})
    return int(rows), int(cols)


def _idefics3_counts(family: str, size: tuple[int, int], config: GlobalComConfig | None) -> Cell:
    n_tok = IDEFICS3_GEOMETRIES[family][2]
    rows, cols = _idefics3_grid(family, tuple(size))
    tiles, layout = num_tiles(max(rows, 1), max(cols, 1)), idefics3_layout_tokens(rows, cols)
    if config is None:
        return Cell(layout + tiles * n_tok, 1.0)
    return Cell(
        layout + internvl_num_image_tokens(config, tiles, n_tok, layout),
        internvl_image_ratio(config, tiles, n_tok, layout),
    )


@functools.cache
def _gemma3_crops(size: tuple[int, int]) -> int:
    """Pan-and-scan crops of Gemma 3's image processor with the released processor's options (crops of 256 px at
    least, at most 4, from an aspect ratio of 1.2)."""
    from transformers import Gemma3ImageProcessorPil

    from ..adapters.gemma3 import pan_and_scan_grid

    options = {
        "do_pan_and_scan": True, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }  # fmt: skip
    return num_tiles(*pan_and_scan_grid(Gemma3ImageProcessorPil(), size[0], size[1], options)) - 1


def _gemma3_counts(size: tuple[int, int], config: GlobalComConfig | None, *, pan_and_scan: bool) -> Cell:
    """Gemma 3 (SigLIP 896/14 pooled 4 x 4: 256 tokens per image): the runs plus ``<start_of_image>`` and
    ``<end_of_image>`` per run; the sentences and newlines around the runs are left out (they depend on the
    checkpoint's tokenizer, which the adapter uses)."""
    crops = _gemma3_crops(tuple(size)) if pan_and_scan else 0
    tiles, layout = crops + 1, 2 * (crops + 1)
    if config is None:
        return Cell(layout + tiles * 256, 1.0)
    return Cell(
        layout + internvl_num_image_tokens(config, tiles, 256, layout),
        internvl_image_ratio(config, tiles, 256, layout),
    )


def markdown_table(
    family: str,
    sizes: Sequence[tuple[int, int]] = SIZES,
    ratio: float = 0.25,
    budgets: Sequence[int] = (288, 576, 1200),
) -> str:
    """One family's table: image size, uncompressed, R = ``ratio``, and every T of ``budgets`` (with its R)."""
    head = ["image (h x w)", "uncompressed", f"R = {ratio:g}", *(f"T = {t}" for t in budgets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        row = [f"{size[0]} x {size[1]}", str(image_counts(family, size, None).tokens)]
        row.append(str(image_counts(family, size, GlobalComConfig(ratio=ratio)).tokens))
        for t in budgets:
            cell = image_counts(family, size, GlobalComConfig(max_image_tokens=t))
            row.append(
                f"{cell.tokens} (R = {cell.ratio:.4f})" if cell.ratio < 1.0 else f"{cell.tokens} (whole)"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def all_tables() -> str:
    """The tables of docs/max_image_tokens.md, one per family."""
    return "\n\n".join(f"**{family}**\n\n{markdown_table(family)}" for family in FAMILIES) + "\n"
