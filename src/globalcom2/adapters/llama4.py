"""Llama 4 adapter: GlobalCom² (paper Eq. 1-6) on HF ``Llama4ForConditionalGeneration``, written as the diff from
the Aya Vision adapter (tiles + a global tile last, pixel shuffle, markers between the runs, spans rewritten whole).

**Tiles.** Llama 4's image processor picks a canvas of ``rows x cols`` tiles of ``size`` px (336 for the released
checkpoints) with ``rows * cols <= max_patches`` (16): the one that needs the least upscaling (or, when none fits
without downscaling, the least downscaling; the smallest area among equals), resizes the image onto it **without
distortion** (never upscaling beyond ``max(image side, size)`` unless ``resize_to_max_canvas``), pads it at the
bottom and right, and cuts it into tiles, row-major. When there is more than one tile it appends a **global tile
last**: the whole image squashed to ``size x size`` (GlobalCom²'s thumbnail). One tile: no global tile, and the
image is its own global view (it keeps its top int(N*R) tokens, as on InternVL). :func:`llama4_canvas` is that rule,
computed from the image size alone; the patched processor checks it against the processor's ``aspect_ratios``.

**Scores: Eq. 1 with the class embedding last.** Llama 4's vision encoder appends its class embedding at the
**end** of each tile's sequence (576 patches, then [CLS]; 2-D RoPE on q and k, the [CLS] position unrotated). Eq. 1
reads the [CLS] row of the last layer's attention: forward hooks take the q and k that layer's ``q_proj`` /
``k_proj`` compute, apply the layer's own rotary embedding to them (exactly as the layer does, in fp32), and move
the last position first (:class:`ClsLastRotaryTap`), so the shared Eq. 1 code scores the [CLS] query against the
576 patch keys (the [CLS] key dropped). The features come from that layer (after ``layernorm_post`` the [CLS]
output is dropped and ``vision_adapter`` pixel-shuffles 2 x 2 patches into one token: 144 per tile), so the layer
runs anyway and scoring adds one (1 x 577) product per tile and head. The patch scores are **summed over each
2 x 2 pixel-shuffle group** (:func:`~globalcom2.adapters.internvl.merge_pool`; Llama 4's ``pixel_shuffle`` merges
rows 2i..2i+1, columns 2j..2j+1 into token (i, j) in raster order). ``importance="cosine"`` scores Eq. 7 on the
patch features ``vision_adapter`` receives, summed alike.

**Selection** is InternVL's (:func:`~globalcom2.adapters.internvl.plan_internvl_batch`): crops are full g x g blocks
of the merged grid, crop j's region on the global tile is the paper's strip rule. Llama 4 feeds the padded area's
tokens to the LLM like any other (no unpadding), so they are candidates too; the global tile shows the image alone,
so where the canvas has padding the strips are an approximation of where each crop lies on it (docs/families.md).

**Prompt.** One image reads::

    <|image_start|>RUN<|tile_x_separator|>RUN...<|tile_y_separator|>...<|tile_y_separator|><|image|>RUN<|image_end|>

(a lone tile: ``<|image_start|><|image|>RUN<|image_end|>``), each RUN a run of ``<|patch|>`` (the model's
``image_token_id``). The separators stay, never pruned; only the runs change length. As on Aya Vision each image
span is rewritten whole (:func:`~globalcom2.adapters.placeholders.rewrite_image_spans`): the processor's own layout
with one placeholder per run, tokenised once per grid, with the runs at their new lengths. Reference mode shrinks the
plain processor's runs to int(N*r_j) and int(N*R) (global tile, descending score order; the official code has no
Llama 4 variant, the rule is the official one with the global tile as the thumbnail); budget mode emits
``int(N*R) + int(R*n*N)`` per image as a provisional split and the model moves the separators to the real split
after scoring. ``max_image_tokens=T`` counts the span's markers (``<|image_start|>``, the separators, ``<|image|>``,
``<|image_end|>``: ``3 + rows * cols`` for a split image, 3 for a lone tile).

**Processor.** ``Llama4Processor.image_token`` (``<|image|>``) is what users write; the runs hold ``<|patch|>``.
The stock ``Llama4ImageProcessor`` needs torchvision; :class:`globalcom2.processors.Llama4ImageProcessorPil` lays
the pixel values out the same way without it (the tests and the offline demo use it).

What is patched (recorded on the handle, undone by ``remove()``): forward hooks on the last vision layer's
``q_proj``/``k_proj`` (or a pre-hook on ``vision_adapter`` for cosine), ``get_image_features``,
``get_placeholder_mask``, the processor's ``_process_images`` (grids) and ``replace_image_token`` (budget counts),
and ``forward``/``generate``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .aya_vision import AyaVisionAdapter
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError
from .family import FamilyAdapter
from .idefics3 import Idefics3Adapter
from .internvl import GRID_KEY, image_sizes_of, num_tiles
from .registry import register_adapter
from .towers import Tap, TowerInfo

#: The image processor options that decide the canvas.
CANVAS_OPTIONS = ("size", "max_patches", "resize_to_max_canvas")


def _canvases(max_patches: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_patches, in the order Llama 4's processor lists them (grouped by
    aspect ratio in first-seen order, tile counts from the largest down; that order breaks ties of equal area)."""
    groups: dict[float, list[tuple[int, int]]] = {}
    for n in range(int(max_patches), 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            groups.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [c for group in groups.values() for c in group]


def llama4_canvas(
    height: int, width: int, tile: int, max_patches: int, resize_to_max_canvas: bool = False
) -> tuple[int, int, int, int]:
    """``(rows, cols, new_height, new_width)``: the tile grid Llama 4's image processor picks for a ``height x width``
    image and the size the image is resized to on it (top-left, padded at the bottom and right). Scales are compared
    in float32, as the processor compares them."""
    canvases = _canvases(max_patches)
    sides = torch.tensor(canvases, dtype=torch.long) * int(tile)
    scales = torch.minimum(sides[:, 0] / int(height), sides[:, 1] / int(width))  # float32, as the processor's
    up = scales[scales >= 1]
    if up.numel():
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = (scales == chosen).nonzero().reshape(-1).tolist()
    best = min(
        candidates, key=lambda i: (int(sides[i, 0] * sides[i, 1]), i)
    )  # smallest area, first among equals
    rows, cols = canvases[best]
    return (rows, cols, *resized_size(height, width, rows, cols, tile, resize_to_max_canvas))


def resized_size(
    height: int, width: int, rows: int, cols: int, tile: int, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """``(new_height, new_width)`` of a ``height x width`` image on a ``rows x cols`` canvas of ``tile`` px tiles:
    the largest size without distortion that fits it (never upscaled beyond ``max(side, tile)`` unless
    ``resize_to_max_canvas``), placed top-left."""
    target_h, target_w = rows * tile, cols * tile
    if not resize_to_max_canvas:
        target_h, target_w = min(max(height, tile), target_h), min(max(width, tile), target_w)
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(int(np.floor(height * scale_w)), target_h)
    else:
        new_h, new_w = target_h, min(int(np.floor(width * scale_h)), target_w)
    return max(new_h, 1), max(new_w, 1)


@dataclass(frozen=True)
class ClsLastRotaryTap(Tap):
    """q or k of Llama 4's vision attention as the layer uses them: the projection's output with the layer's 2-D
    rotary embedding applied (fp32 complex product, as ``vision_apply_rotary_emb``), the last position ([CLS])
    moved first so that the shared Eq. 1 code finds it where other towers have it."""

    rotary: Any = None  # the tower's Llama4VisionRotaryEmbedding (its ``freqs_ci``: (S, 1, head_dim / 2))
    head_dim: int = 0

    def take(self, output: torch.Tensor) -> torch.Tensor:
        b, s, _ = output.shape
        pairs = torch.view_as_complex(output.float().reshape(b, s, -1, self.head_dim // 2, 2))
        freqs = self.rotary.freqs_ci.to(output.device).reshape(1, s, 1, -1)
        rotated = torch.view_as_real(pairs * freqs).flatten(2).type_as(output)
        return torch.cat([rotated[:, -1:], rotated[:, :-1]], dim=1)


def describe_llama4_tower(tower: Any) -> TowerInfo:
    """Scoring pieces of ``Llama4VisionModel``: its last layer's q/k (rotated, [CLS] moved first)."""
    layer = tower.model.layers[-1]
    att = layer.self_attn
    heads = int(att.num_heads)
    q = ClsLastRotaryTap(att.q_proj, rotary=tower.rotary_embedding, head_dim=int(att.head_dim))
    k = ClsLastRotaryTap(att.k_proj, rotary=tower.rotary_embedding, head_dim=int(att.head_dim))
    return TowerInfo(
        "llama4_vision", layer, layer.input_layernorm, att.q_proj, att.k_proj, heads, 1, True, q, k
    )


@register_adapter
class Llama4Adapter(AyaVisionAdapter):
    """GlobalCom² for ``Llama4ForConditionalGeneration`` + ``Llama4Processor``."""

    family = "llama4"
    model_class_name = "Llama4ForConditionalGeneration"
    processor_class_name = "Llama4Processor"
    inner_name: ClassVar[str | None] = None  # the tower, projector and LLM hang off the model itself
    vision_tower_name = "vision_model"
    feature_field: ClassVar[str] = "last_hidden_state"  # Llama 4's forward projects last_hidden_state
    token_layout: ClassVar[str] = "tiles + global tile; separators not counted"
    layout_label: ClassVar[str] = "<|image_start|>, tile separators, <|image|> and <|image_end|> included"

    # The layout depends on the grid (x and y separators), not only the tile count.
    num_image_tokens_for_tiles = Idefics3Adapter.num_image_tokens_for_tiles

    def merge_factor(self) -> int:
        return int(round(1 / float(self.model.config.vision_config.pixel_shuffle_ratio)))

    def describe_tower(self, tower: Any) -> TowerInfo:
        return describe_llama4_tower(tower)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        ratio = float(self.model.config.vision_config.pixel_shuffle_ratio)
        if self.factor < 1 or abs(ratio * self.factor - 1) > 1e-9 or self.patches_per_side % self.factor:
            raise ValueError(
                f"pixel_shuffle_ratio={ratio} must be 1/k with k dividing the {self.patches_per_side} patches per "
                "tile side"
            )

    def processor_image_token_id(self) -> int | None:
        tok = self.processor.tokenizer  # type: ignore[union-attr]
        return tok.convert_tokens_to_ids(self.processor.img_patch_token)  # type: ignore[union-attr]

    def check_processor(self) -> None:
        proc: Any = self.processor
        size = proc.image_processor.size
        hw = (
            (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (size.height, size.width)
        )
        if (
            int(proc.patch_size) != self.patch
            or int(proc.downsample_ratio) != self.factor**2
            or hw != self.tile_hw
        ):
            raise IncompatibleProcessorError(
                f"processor/model mismatch: patch_size {proc.patch_size}, downsample_ratio {proc.downsample_ratio} "
                f"and tile size {hw} vs the tower's {self.patch} px patches, {self.factor}x{self.factor} pixel "
                f"shuffle and {self.tile_hw} tiles"
            )
        tok = proc.tokenizer
        markers = (proc.start_of_img_token, proc.end_of_img_token, proc.img_patch_token, proc.image_token,
                   proc.tile_token, proc.tile_global_token)  # fmt: skip
        for marker in markers:
            if tok.convert_tokens_to_ids(marker) in (None, tok.unk_token_id):
                raise IncompatibleProcessorError(
                    f"the tokenizer has no single token {marker!r}; GlobalCom² locates each image span by it"
                )

    # -- scores: Eq. 1 with the class embedding last (or Eq. 7), summed per pixel-shuffle group -----------------
    def install_scoring(self, handle: GlobalComHandle) -> None:
        if self.importance == "cls":
            FamilyAdapter.install_scoring(self, handle)
            return
        adapter = getattr(self.inner, self.vision_tower_name).vision_adapter
        handle.add_hook(adapter.register_forward_pre_hook(functools.partial(self._connector_hook, handle)))

    def needs_last_layer(self, signature: Any, args: tuple, kwargs: dict) -> bool:
        return True  # Llama 4's features always come from the last layer

    # -- processor side ----------------------------------------------------------------------------------------
    def canvas_options(self, **kwargs: Any) -> dict:
        """The canvas options the processor uses for a call with ``kwargs`` (its own merge)."""
        return self.image_processor_options(CANVAS_OPTIONS, **kwargs)

    def grid_for_image(self, height: int, width: int, **kwargs: Any) -> tuple[int, int]:
        """(rows, cols) of tiles the processor makes for a ``height x width`` image (:func:`llama4_canvas`;
        call ``kwargs`` such as ``max_patches=4`` override the processor's options); (1, 1): a lone tile."""
        return self._grid(height, width, self.canvas_options(**kwargs))

    def _grid(self, height: int, width: int, options: dict) -> tuple[int, int]:
        size = options["size"]
        tile = int(size["height"]) if isinstance(size, dict) else int(size.height)
        rows, cols, _, _ = llama4_canvas(
            height, width, tile, int(options["max_patches"]), bool(options["resize_to_max_canvas"])
        )
        return rows, cols

    def num_image_tokens(self, height: int, width: int, **kwargs: Any) -> int:
        """``<|patch|>`` tokens the LLM receives for one ``height x width`` image in budget mode (markers not
        included)."""
        return self.num_image_tokens_for_grid(self.grid_for_image(height, width, **kwargs))

    def ratio_for_image(self, height: int, width: int, **kwargs: Any) -> float:
        return self.ratio_for_grid(self.grid_for_image(height, width, **kwargs))

    def _process_images(self, original: Any, images: Any, **kwargs: Any) -> Any:
        processed, replacements = original(images, **kwargs)
        ip = self.processor.image_processor
        options = {
            k: kwargs.get(k) if kwargs.get(k) is not None else getattr(ip, k, None) for k in CANVAS_OPTIONS
        }
        grids = []
        for (height, width), made in zip(image_sizes_of(images), processed["aspect_ratios"], strict=True):
            grid = self._grid(height, width, options)
            if tuple(int(v) for v in made) != grid:
                raise RuntimeError(
                    f"GlobalCom²: the image processor made a {made[0]}x{made[1]} tile grid for a {height}x{width} "
                    f"image but its rule gives {grid[0]}x{grid[1]}; cannot recover the tile grid"
                )
            grids.append(list(grid))
        processed[GRID_KEY] = grids
        return processed, replacements

    def layout_key(self, grid: tuple[int, int]) -> tuple[int, int]:
        return (int(grid[0]), int(grid[1])) if num_tiles(*grid) > 1 else (1, 1)

    def layout_inputs(self, grid: tuple[int, int]) -> dict:
        return {"aspect_ratios": [list(self.layout_key(grid))]}

    def grid_of_inputs(self, image_inputs: dict, image_idx: int) -> tuple[int, int]:
        rows, cols = (int(v) for v in image_inputs["aspect_ratios"][image_idx])
        return self.layout_key((rows, cols))

    def one_token_layout(self, replace: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """The processor's own text for one image with one ``<|patch|>`` per run: its ``replace_image_token`` on
        a tile whose size gives one token (``patch_size x patch_size * downsample_ratio`` px, no pixels)."""
        proc: Any = self.processor
        p, ratio = int(proc.patch_size), int(proc.downsample_ratio)
        tile = np.broadcast_to(np.zeros((1, 1, 1), dtype=np.float32), (3, p, p * ratio))
        inputs = {**image_inputs, "pixel_values": [tile]}
        return getattr(replace, "__func__", replace)(proc, inputs, image_idx, **kwargs)

    @property
    def placeholder_text(self) -> str:
        return str(self.processor.img_patch_token)  # type: ignore[union-attr]

    # -- model side --------------------------------------------------------------------------------------------
    @staticmethod
    def overlay_geometry(model: Any, image: Any, plan: Any) -> tuple[Any, int, tuple[int, int]]:
        """The canvas as the tiles see it: the image resized without distortion, top-left, padded black (the
        processor's default ``resize_to_max_canvas=False``)."""
        from PIL import Image

        tile = int(model.config.vision_config.image_size)
        rows, cols = (max(int(v), 1) for v in plan.grid)
        canvas = Image.new("RGB", (cols * tile, rows * tile))
        new_h, new_w = resized_size(image.height, image.width, rows, cols, tile)
        canvas.paste(image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR))
        return canvas, tile, (rows * tile, cols * tile)

    @staticmethod
    def render_plan(model: Any, image: Any, plan: Any, title: str, out_path: Any = None) -> Any:
        """The Figure-7 overlay: the tiles on the padded canvas (:meth:`overlay_geometry`), the global tile from the
        photo itself (:func:`globalcom2.viz.overlay.render_overlay`)."""
        from ..viz.overlay import render_overlay

        canvas, tile, best = Llama4Adapter.overlay_geometry(model, image, plan)
        return render_overlay(
            canvas,
            plan,
            tile_size=tile,
            best_resolution=best,
            title=title,
            out_path=out_path,
            thumbnail=image,
        )


ADAPTER = Llama4Adapter
