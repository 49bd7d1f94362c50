"""Gemma 3 adapter: GlobalCom² (paper Eq. 2-7) on HF ``Gemma3ForConditionalGeneration``, written as the diff from
the Idefics3 adapter (runs framed by markers, the per-crop split moved by the model in budget mode).

Gemma 3 encodes every image at one size (896 px for the released checkpoints): a SigLIP tower gives a 64 x 64 patch
grid and the projector average-pools it 4 x 4 into 256 tokens. With ``do_pan_and_scan=True`` the processor also cuts
a long image into 2 to ``pan_and_scan_max_num_crops`` crops along its long side (a ``1 x n`` grid for a landscape
image, ``n x 1`` for a portrait one; none when the aspect ratio is below ``pan_and_scan_min_ratio_to_activate`` or a
crop would be smaller than ``pan_and_scan_min_crop_size``) and encodes each crop as a further image. The prompt
reads::

    Here is the original image \\n\\n<start_of_image><image_soft_token>...<end_of_image>\\n\\n and here are some
    crops to help you see better \\n\\n<start_of_image>...<end_of_image>\\n\\n \\n\\n<start_of_image>...

**Global view and crops.** The original image (squashed to one tile) is GlobalCom²'s thumbnail, the pan-and-scan
crops are its crops, in the processor's order (left to right, top to bottom). So the geometry is InternVL's with the
thumbnail *first*: crops are full blocks of the pooled 16 x 16 grid (no padding), crop j's region on the thumbnail
is the paper's rule (:func:`~globalcom2.core.layout.thumbnail_region_map`: equal strips, the last absorbing the
remainder; the processor's last crop is at most a few pixels narrower), and the selection is
:func:`~globalcom2.adapters.internvl.plan_internvl_batch`. An image without crops (pan-and-scan off, the default, or
not triggered) is a single tile: its own global view, it keeps its top int(N*R) tokens by the thumbnail rule.

**Eq. 7 before the pooling.** SigLIP has no [CLS]. Eq. 7 scores the 64 x 64 patch features the projector receives
(s_i = -cos(x_i, g), g the mean of the tile's patches), and a pooled token's score is the **sum over its 4 x 4
pooling group** (:func:`~globalcom2.adapters.internvl.merge_pool`), the rule every family here uses for tokens made
of several patches. Why before: Eq. 7 is defined on the vision encoder's tokens, and the projector's pooling is
part of the connector, not the encoder; g is the same vector either way (average pooling over equal groups keeps
the mean), but the pooled token is a mean, so one distinctive patch among 15 common ones (a stroke of text) is
diluted 16-fold before a post-pooling cosine sees it, while the sum of the patch scores keeps its contribution.
Scoring 4096 patches instead of 256 tokens costs one more cosine per patch (measured in ``bench --vision-stage``).

**Bidirectional attention.** Gemma 3's LLM lets the tokens of one image run attend to each other both ways
(``token_type_ids`` = 1 on image tokens; a run of ones is one block). Kept tokens stay contiguous in their run and
the token type ids are resized with it (new placeholders get type 1, markers keep 0), so each run stays one block.

**Per-crop runs.** As on Idefics3, the runs keep their markers (``<start_of_image>`` heads every run) and only
their lengths change: reference mode shrinks the plain processor's runs to int(N*R) (thumbnail, descending score
order) and int(N*r_j); budget mode emits ``int(N*R) + int(R*n*N)`` per image (a function of the crop count and R;
:meth:`num_image_tokens_for_grid`) as a provisional split, and the model moves each marker to the head of its
crop's real run after scoring. ``max_image_tokens=T`` counts the layout (the sentences, newlines and markers, as the
tokenizer tokenises them: :meth:`layout_tokens`). Reference mode is defined here (the official rule of per-crop
counts int(N_j*r_j) with the original image as the thumbnail); the official code has no Gemma 3 variant.

**Processor.** ``Gemma3Processor.image_token`` is ``<start_of_image>`` (what users write); the runs hold the
tokenizer's ``<image_soft_token>``, the model's ``image_token_id``. The patched processor passes each image's crop
grid on (``globalcom2_tile_grids``, from the image size and the image processor's own ``pan_and_scan``).

What is patched (recorded on the handle, undone by ``remove()``): a pre-hook on ``multi_modal_projector``,
``get_image_features``, ``get_placeholder_mask``, the processor's ``_process_images`` (grids),
``replace_image_token`` and ``_get_num_multimodal_tokens`` (budget counts), and ``forward``/``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.plan import Plan
from .errors import IncompatibleProcessorError
from .idefics3 import Idefics3Adapter
from .internvl import GRID_KEY, image_sizes_of, num_tiles, plan_internvl_batch
from .registry import register_adapter
from .towers import TowerInfo, describe_tower

#: The image processor options that decide the pan-and-scan crops.
PAN_AND_SCAN_OPTIONS = (
    "do_pan_and_scan",
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)


def pan_and_scan_grid(image_processor: Any, height: int, width: int, options: dict) -> tuple[int, int]:
    """(rows, cols) of the pan-and-scan crops of a ``height x width`` image, by the image processor's own
    ``pan_and_scan`` (run on a zero-stride array: no pixels are touched); (1, 1) when it makes none.

    Raises:
        NotImplementedError: for a single crop (``pan_and_scan_max_num_crops=1``): the crop is the whole image
            again, which GlobalCom² does not split.
    """
    if not options.get("do_pan_and_scan"):
        return 1, 1
    canvas = np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (3, int(height), int(width)))
    crops = image_processor.pan_and_scan(image=canvas, **{k: options[k] for k in PAN_AND_SCAN_OPTIONS[1:]})
    n = _check_crop_count(len(crops))
    if n == 0:
        return 1, 1
    return (1, n) if width >= height else (n, 1)


def _check_crop_count(n: int) -> int:
    if n == 1:
        raise NotImplementedError(
            "GlobalCom²: pan-and-scan made a single crop (pan_and_scan_max_num_crops=1), the whole image again; "
            "use pan_and_scan_max_num_crops >= 2 or do_pan_and_scan=False"
        )
    return n


class _OneTokenImage:
    """A Gemma 3 processor seen with one placeholder per image run (its ``full_image_sequence`` holds one)."""

    def __init__(self, processor: Any) -> None:
        tok = processor.tokenizer
        self.full_image_sequence = f"\n\n{tok.boi_token}{tok.image_token}{tok.eoi_token}\n\n"


@register_adapter
class Gemma3Adapter(Idefics3Adapter):
    """GlobalCom² for ``Gemma3ForConditionalGeneration`` + ``Gemma3Processor``."""

    family = "gemma3"
    model_class_name = "Gemma3ForConditionalGeneration"
    processor_class_name = "Gemma3Processor"
    vision_tower_name = "vision_tower"
    projector_name: ClassVar[str] = "multi_modal_projector"
    thumbnail_first: ClassVar[bool] = True
    inserted_values: ClassVar[dict[str, int]] = {"token_type_ids": 1}  # an image token's type
    #: ``visualize`` and the workflows show Gemma 3's high-resolution mode, where GlobalCom² has crops to allocate
    plan_processor_kwargs: ClassVar[dict[str, Any]] = {"do_pan_and_scan": True}
    token_layout: ClassVar[str] = "original image + pan-and-scan crops; markers and sentences not counted"
    layout_label: ClassVar[str] = "markers, sentences and newlines included"

    def merge_factor(self) -> int:
        """The projector's pooling kernel: patches per side over pooled tokens per side."""
        return self.patches_per_side // max(int(round(int(self.model.config.mm_tokens_per_image) ** 0.5)), 1)

    def describe_tower(self, tower: Any) -> TowerInfo:
        return describe_tower(tower)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        cfg = self.model.config
        if self.g * self.g != int(cfg.mm_tokens_per_image) or self.g * self.factor != self.patches_per_side:
            raise ValueError(
                f"mm_tokens_per_image={cfg.mm_tokens_per_image} must be the square of a divisor of the "
                f"{self.patches_per_side} patches per tile side (the projector's pooling grid)"
            )

    def processor_image_token_id(self) -> int | None:
        return getattr(self.processor.tokenizer, "image_token_id", None)  # type: ignore[union-attr]

    def check_processor(self) -> None:
        processor: Any = self.processor
        if int(processor.image_seq_length) != self.g * self.g:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image_seq_length {processor.image_seq_length} vs {self.g}x{self.g} "
                "pooled tokens per image"
            )
        size = processor.image_processor.size
        hw = (
            (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (size.height, size.width)
        )
        if tuple(hw) != self.tile_hw:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image size {hw} vs the tower's image_size {self.tile_hw}"
            )
        boi = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.boi_token)
        if boi is None or boi == processor.tokenizer.unk_token_id:
            raise IncompatibleProcessorError(
                "the tokenizer has no single <start_of_image> token; GlobalCom² locates each run by it"
            )
        self.anchor_ids = torch.tensor([int(boi)])

    # -- processor side ----------------------------------------------------------------------------------------
    def pan_and_scan_options(self, **kwargs: Any) -> dict:
        """The pan-and-scan options the processor uses for a call with ``kwargs`` (its own merge)."""
        return self.image_processor_options(PAN_AND_SCAN_OPTIONS, **kwargs)

    def grid_for_image(self, height: int, width: int, **kwargs: Any) -> tuple[int, int]:
        """(rows, cols) of pan-and-scan crops of a ``height x width`` image with the processor's options (call
        ``kwargs`` such as ``do_pan_and_scan=True`` override them); (1, 1): a single tile."""
        ip = self.processor.image_processor
        return pan_and_scan_grid(ip, height, width, self.pan_and_scan_options(**kwargs))

    def num_image_tokens(self, height: int, width: int, **kwargs: Any) -> int:
        """Image tokens the LLM receives for one ``height x width`` image in budget mode (markers not included)."""
        return self.num_image_tokens_for_grid(self.grid_for_image(height, width, **kwargs))

    def ratio_for_image(self, height: int, width: int, **kwargs: Any) -> float:
        return self.ratio_for_grid(self.grid_for_image(height, width, **kwargs))

    def layout_inputs(self, grid: tuple[int, int]) -> dict:
        return {"num_crops": [num_tiles(*grid) - 1]}

    def grid_of_inputs(self, image_inputs: dict, image_idx: int) -> tuple[int, int]:
        # The runs and layout depend on the crop count only: (1, n) stands for n crops either way.
        n = _check_crop_count(int(image_inputs["num_crops"][image_idx]))
        return (1, n) if n else (1, 1)

    def one_token_layout(self, replace: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return getattr(replace, "__func__", replace)(_OneTokenImage(self.processor), image_inputs, image_idx)

    @property
    def placeholder_text(self) -> str:
        return str(self.processor.tokenizer.image_token)  # type: ignore[union-attr]

    def _num_multimodal_tokens(self, original: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
        out = original(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:  # HF counts one run's soft tokens; ours: all runs, pan-and-scan included
            grids = [self.grid_for_image(int(h), int(w), **kwargs) for h, w in image_sizes]
            out.num_image_patches = [num_tiles(*g) for g in grids]
            out.num_image_tokens = [self.num_image_tokens_for_grid(g) for g in grids]
        return out

    def _process_images(self, original: Any, images: Any, **kwargs: Any) -> Any:
        processed, replacements = original(images, **kwargs)
        counts = [int(n) for n in np.asarray(processed["num_crops"]).reshape(-1)]
        ip = self.processor.image_processor
        options = {k: kwargs.get(k, getattr(ip, k, None)) for k in PAN_AND_SCAN_OPTIONS}
        grids = []
        for (height, width), n in zip(image_sizes_of(images), counts, strict=True):
            grid = pan_and_scan_grid(ip, height, width, options) if n else (1, 1)
            if num_tiles(*grid) - 1 != n:
                raise RuntimeError(
                    f"GlobalCom²: the image processor made {n} pan-and-scan crops for a {height}x{width} image but "
                    f"its rule gives a {grid[0]}x{grid[1]} grid; cannot recover the crop grid"
                )
            grids.append(list(grid))
        processed[GRID_KEY] = grids
        return processed, replacements

    # -- model side: InternVL's selection with the thumbnail first ------------------------------------------
    def plan_images(
        self, tile_scores: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[Plan, torch.Tensor]]:
        """Plan the images of one call (:func:`plan_internvl_batch`): Gemma's tiles are the original image then
        the crops, so the thumbnail is moved last for the selection and the kept indices moved back; the LLM reads
        the thumbnail's run first."""
        n_tok = self.g * self.g
        planned = plan_internvl_batch(
            [torch.roll(t, -1, dims=0) for t in tile_scores], grids, self.g, self.config,
            [self.layout_tokens(g) for g in grids],
        )  # fmt: skip
        out = []
        for (plan, index), scores in zip(planned, tile_scores, strict=True):
            moved = (index + n_tok) % (scores.shape[0] * n_tok)  # thumbnail from last to first
            k = plan.thumbnail_order.numel() if plan.thumbnail_order is not None else 0
            out.append((plan, torch.cat([moved[index.numel() - k :], moved[: index.numel() - k]])))
        return out

    # -- inside the LLM (the LLM-side methods) -----------------------------------------------------------------
    def pruned_llm_masks(
        self, lm: Any, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any, layers: range,
        entries: dict[str, torch.Tensor] | None, token_type_ids: torch.Tensor | None,
    ) -> Any:  # fmt: skip
        """Gemma 3's own masks for a pruned prompt: every image run stays one bidirectional block.

        The kept entries take their token types from the caller's ``token_type_ids`` (an inserted SparseVLM token
        is an image token: it sits right after the last kept image token, so it joins that run), and HF's own
        rule (``create_masks_for_vision_model``) builds the full-attention mask, OR(causal, block), and the
        sliding-window mask, AND(window, OR(causal, block)), for the pruned sequence. The window counts entries of
        the pruned sequence (what the stage's layers and their caches hold), not original positions. Sized for
        the stage's layers, whose caches are empty in prefill (``cache=None``). Decode (text queries) and calls
        without ``token_type_ids`` use the pruner's causal / sliding-window masks (None), as HF does.
        """
        if entries is None or token_type_ids is None:
            return None
        from transformers.models.gemma3 import modeling_gemma3 as gemma

        origin = entries["origin"]
        types = token_type_ids.to(origin.device).gather(1, origin.clamp_min(0))
        types = torch.where(origin >= 0, types, entries["image"].to(types.dtype))
        types = torch.where(entries["valid"], types, 0)
        blocks = gemma.get_block_sequence_ids_for_mask(types, device=hidden.device)
        # positional: the cache argument is `cache` from transformers 5.20 on, `past_key_values` before
        return gemma.create_masks_for_vision_model(
            lm.config, hidden, mask2d, None, None, block_sequence_ids=blocks
        )

    def encode_for_reference(self, handle: Any, kwargs: dict) -> dict[str, Any] | None:
        if handle.state.context.get(GRID_KEY) is None:
            return None  # no crop grids: left uncompressed (see the InternVL adapter)
        features = self.inner.get_image_features(pixel_values=kwargs.pop("pixel_values"), return_dict=True)
        return {"image": features}


ADAPTER = Gemma3Adapter
