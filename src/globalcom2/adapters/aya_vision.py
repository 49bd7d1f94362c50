"""Aya Vision adapter: GlobalCom² (paper Eq. 2-7) on HF ``AyaVisionForConditionalGeneration``, written as the diff
from the Idefics3 adapter (InternVL's tiles, a marker before every crop's run).

Aya Vision tiles an image exactly as InternVL does (``GotOcr2ImageProcessorPil``: a rows x cols grid of crops chosen
by aspect ratio, the image stretched onto it, the **thumbnail last**; one tile when the grid is 1 x 1), encodes each
tile with SigLIP (2) and pixel-shuffles every ``downsample_factor`` x ``downsample_factor`` patches into one token
in its projector (Aya-Vision-8B: 364 px tiles of 14 px patches, 2 x 2: 169 tokens per tile). So the geometry and
the selection are InternVL's (:func:`~globalcom2.adapters.internvl.plan_internvl_batch`), and the scores are
Idefics3's: SigLIP has no [CLS], so Eq. 7 on the projector's input, one score per patch, **summed over each pixel-
shuffle group** (:func:`~globalcom2.adapters.internvl.merge_pool`). An image of one tile is its own global view
and keeps its top int(N*R) tokens.

What differs is the prompt. Every tile's run follows a text marker::

    <|START_OF_IMG|>TILE_1<|IMG_PATCH|>...TILE_2<|IMG_PATCH|>...TILE_GLOBAL<|IMG_PATCH|>...<|END_OF_IMG|>

``TILE_k`` and ``TILE_GLOBAL`` are ordinary text: their tokens also occur elsewhere in a prompt, so unlike
Idefics3's markers they cannot locate a run by their ids. Inside an image span, though, every token is the
layout's. So the model-side resize **rewrites each image span whole**: the processor's own layout with one
placeholder per run, tokenised once per crop grid, with the runs at their new lengths
(:func:`~globalcom2.adapters.placeholders.rewrite_image_spans`). Reference mode shrinks the plain processor's runs to
int(N*R) (thumbnail, descending score order) and int(N*r_j); budget mode emits ``int(N*R) + int(R*n*N)`` per image as
a provisional split and the model moves the markers to the real split after scoring (the span keeps its length).
``max_image_tokens=T`` counts the span's markers as the tokenizer tokenises them.

Cohere2 Vision is the diff from this adapter (:mod:`globalcom2.adapters.cohere2_vision`): its own tile grid, a line
break after every run instead of a marker before it.

What is patched (recorded on the handle, undone by ``remove()``): a pre-hook on ``multi_modal_projector``,
``get_image_features``, ``get_placeholder_mask``, the processor's ``_process_images`` (grids), ``replace_image_token``
and ``_get_num_multimodal_tokens`` (budget counts), and ``forward``/``generate``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .errors import IncompatibleProcessorError
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter, num_tiles
from .placeholders import pad_token_id, rewrite_image_spans
from .registry import register_adapter
from .towers import TowerInfo, describe_tower


class _OneTokenTiles:
    """An Aya Vision processor seen with one placeholder per tile: its own ``replace_image_token`` then writes its
    exact layout (markers) with one ``<|IMG_PATCH|>`` per run."""

    img_size = 1
    patch_size = 1

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


@register_adapter
class AyaVisionAdapter(Idefics3Adapter):
    """GlobalCom² for ``AyaVisionForConditionalGeneration`` + ``AyaVisionProcessor``."""

    family = "aya_vision"
    model_class_name = "AyaVisionForConditionalGeneration"
    processor_class_name = "AyaVisionProcessor"
    vision_tower_name = "vision_tower"
    projector_name: ClassVar[str] = "multi_modal_projector"
    token_layout: ClassVar[str] = "crops + thumbnail; TILE markers not counted"
    layout_label: ClassVar[str] = "<|START_OF_IMG|>, TILE markers and <|END_OF_IMG|> included"

    # InternVL's tiling, tile grids and reference encode; Idefics3's runs and scores.
    grid_for_image = InternVLAdapter.grid_for_image
    _process_images = InternVLAdapter._process_images
    encode_for_reference = InternVLAdapter.encode_for_reference

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)
        self._segments: dict[tuple[int, int], list[torch.Tensor]] = {}  # layout between the runs (span_ids)

    def merge_factor(self) -> int:
        return int(self.model.config.downsample_factor)

    def describe_tower(self, tower: Any) -> TowerInfo:
        return describe_tower(tower)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        cfg = self.model.config
        if self.factor < 1 or self.patches_per_side % self.factor:
            raise ValueError(
                f"downsample_factor={cfg.downsample_factor} must be a positive integer dividing the "
                f"{self.patches_per_side} patches per tile side"
            )
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        if prefix != self.tower.num_prefix_tokens or not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with "
                f"{self.tower.num_prefix_tokens} prefix token(s) and vision_feature_layer={cfg.vision_feature_layer!r}"
                " is not supported: GlobalCom² needs one feature per patch from one layer"
            )

    def check_processor(self) -> None:
        proc: Any = self.processor
        per_tile = (int(proc.img_size) // int(proc.patch_size)) ** 2
        if per_tile != self.g * self.g or int(proc.img_size) != self.tile_hw[0]:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: img_size {proc.img_size} with {per_tile} tokens per tile vs the "
                f"tower's {self.tile_hw[0]} px and {self.g}x{self.g} merged tokens"
            )
        tok = proc.tokenizer
        for marker in (*self.span_markers(), self.placeholder_text):
            if tok.convert_tokens_to_ids(marker) in (None, tok.unk_token_id):
                raise IncompatibleProcessorError(
                    f"the tokenizer has no single token {marker!r}; GlobalCom² locates each image span by it"
                )

    # -- the layout ------------------------------------------------------------------------------------------
    def layout_inputs(self, grid: tuple[int, int]) -> dict:
        return {"num_patches": [num_tiles(*grid)]}

    def grid_of_inputs(self, image_inputs: dict, image_idx: int) -> tuple[int, int]:
        # The runs and layout depend on the tile count only: (1, n) stands for n crops whatever their grid.
        tiles = int(image_inputs["num_patches"][image_idx])
        return (1, tiles - 1) if tiles > 1 else (1, 1)

    def one_token_layout(self, replace: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return getattr(replace, "__func__", replace)(_OneTokenTiles(self.processor), image_inputs, image_idx)

    @property
    def placeholder_text(self) -> str:
        return str(self.processor.img_patch_token)  # type: ignore[union-attr]

    num_image_tokens_for_tiles = InternVLAdapter.num_image_tokens_for_tiles  # Idefics3's depends on the grid

    def _num_multimodal_tokens(self, original: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
        out = original(image_sizes=image_sizes, **kwargs)
        patches = getattr(out, "num_image_patches", None)
        if patches is not None:  # the prompt's count, as HF's: the markers plus the (budget) runs
            grids = [(1, int(t) - 1) if int(t) > 1 else (1, 1) for t in patches]
            out.num_image_tokens = [self.layout_tokens(g) + self.num_image_tokens_for_grid(g) for g in grids]
        return out

    def span_markers(self) -> tuple[str, str]:
        """The tokens that open and close an image span (``<|START_OF_IMG|>``, ``<|END_OF_IMG|>``)."""
        proc: Any = self.processor
        return str(proc.start_of_img_token), str(proc.end_of_img_token)

    def layout_key(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid that stands for every grid of the same layout: Aya's depends on the tile count only."""
        return (1, num_tiles(*grid) - 1) if num_tiles(*grid) > 1 else (1, 1)

    # -- model side: rewrite each image span with its runs at their new lengths -------------------------------
    def span_ids(self, grid: tuple[int, int], runs: list[int]) -> torch.Tensor:
        """The token ids of one image's span (``<|START_OF_IMG|>`` ... ``<|END_OF_IMG|>``) with these run lengths."""
        key = self.layout_key(grid)
        if key not in self._segments:  # the layout's tokens between the runs, once per tile count
            proc: Any = self.processor
            text = self.one_token_layout(type(proc).replace_image_token, self.layout_inputs(key), 0)
            ids = torch.tensor(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
            cut = (ids == self.model.config.image_token_id).nonzero().reshape(-1).tolist()
            bounds = [-1, *cut, ids.numel()]
            self._segments[key] = [ids[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        segments = self._segments[key]
        token = self.model.config.image_token_id
        parts = [segments[0]]
        for run, segment in zip(runs, segments[1:], strict=True):
            parts += [torch.full((int(run),), token, dtype=torch.long), segment]
        return torch.cat(parts)

    def resize_placeholders(
        self, input_ids: torch.Tensor, plans: list[Any], extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Give every tile's run its plan's length by rewriting each image span (module docstring)."""
        n_tok = self.g * self.g
        new = iter(self.placeholder_run_counts(plans))
        old_spans, new_spans = [], []
        for p in plans:
            grid = p.grid if p.num_crops else (1, 1)
            tiles = num_tiles(*grid)
            old = self.emitted_runs(grid) if self.config.mode == "budget" else [n_tok] * tiles
            old_spans.append(self.span_ids(grid, old))
            new_spans.append(self.span_ids(grid, [next(new) for _ in range(tiles)]))
        proc: Any = self.processor
        tok = proc.tokenizer
        hint = (
            "make the inputs with the processor patched by this apply() (call it again after apply())"
            if self.config.mode == "budget"
            else "in reference mode make the inputs with the plain processor"
        )
        return rewrite_image_spans(
            input_ids, start_id=int(tok.convert_tokens_to_ids(self.span_markers()[0])),
            end_id=int(tok.convert_tokens_to_ids(self.span_markers()[1])), old_spans=old_spans, new_spans=new_spans,
            image_token_id=self.model.config.image_token_id, pad_token_id=pad_token_id(self.model, self.processor),
            extra=extra, hint=hint,
        )  # fmt: skip


ADAPTER = AyaVisionAdapter
