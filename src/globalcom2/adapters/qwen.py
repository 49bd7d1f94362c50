"""Native-resolution families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (paper Eq. 2-7 with a virtual global view).

These models encode the whole image at its own resolution: the processor resizes it to a multiple of 28 px (Qwen2-VL,
Qwen2.5-VL: 14 px patches) or 32 px (Qwen3-VL, Qwen3.5: 16 px patches), the vision tower's merger folds every 2 x 2
patches into one LLM token, and ``image_grid_thw`` gives the patch grid ``(1, h, w)`` of every image, so the LLM
reads ``H x W = (h/2) x (w/2)`` tokens in raster order. No thumbnail, no crops, no [CLS].

**The rule** (:mod:`globalcom2.core.regions`): regions of at most ``G x G`` merged tokens (``region_tokens``, 16 by
default) play the crops, the features average-pooled to at most ``G x G`` cells play the thumbnail (scored by Eq. 7
against the whole image's mean; it hands no token to the LLM), every token's local score is Eq. 7 against its
region's mean, and the one selection (:func:`~globalcom2.core.select.select_images`) runs Eq. 2-6 as for every
family. **Eq. 7 reads the merger's output**, the very vectors the LLM receives, one per merged token: they are in
the LLM's raster order in every tower (Qwen2.5-VL's window attention reorders the merger's *input*, and undoes it
only after the merger), "distinctive" is then measured on what is kept, and scoring needs no hook and no extra pass.

**Budget mode only.** An image keeps ``int(R * H * W)`` tokens (at least one, so that it stays in the prompt and its
M-RoPE grid stays aligned): :func:`qwen_num_image_tokens`, a function of ``image_grid_thw`` and R (or
``max_image_tokens``, which bounds the ``<|image_pad|>`` count; the ``<|vision_start|>``/``<|vision_end|>``
markers come from the chat template and are not counted). The patched processor emits exactly that many
``<|image_pad|>``. Reference mode is refused: there is no official GlobalCom² code for these models to follow.

**Positions (M-RoPE).** Every kept token keeps the ``(t, h, w)`` position it has in the uncompressed run, and the text
after an image keeps its uncompressed positions: the model's ``get_rope_index`` is wrapped so that it runs on the
sequence with every dropped token put back (:func:`expand_kept_tokens`), then reads the kept tokens' positions, and
its ``rope_deltas`` (which decoding adds to the step index) grow by the number of dropped tokens. ``forward`` and
``generate`` encode the images first, so the kept sets are known when ``generate`` prepares its positions.

**Qwen3-VL deepstack.** The deepstack features (one per deepstack layer, one row per image token) are trimmed with
the same index as the image features, so they, ``visual_pos_masks`` and the placeholders stay aligned.

**Videos** pass through uncompressed (one warning per handle); a prompt mixing images and videos compresses the
images only.

What is patched (recorded on the handle, undone by ``remove()``): ``get_image_features``, ``get_placeholder_mask``
and ``get_rope_index`` of the inner model, ``forward``/``generate``, the processor's ``replace_image_token`` and
``_get_num_multimodal_tokens``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..core.plan import Plan
from ..core.ranking import true_indices
from ..core.regions import native_num_tokens, native_ratio, native_selection_input, pooled_shape, region_grid
from ..core.select import kept_crop_tokens, select_images
from .base import GlobalComHandle
from .errors import PlaceholderMismatchError, UnsupportedModelError
from .family import FamilyAdapter
from .registry import register_adapter
from .towers import TowerInfo

#: the default G: 16 merged tokens = 448 px (Qwen2-VL, Qwen2.5-VL) or 512 px (Qwen3-VL, Qwen3.5)
DEFAULT_REGION_TOKENS = 16


def region_tokens_of(config: Any) -> int:
    """G of a :class:`~globalcom2.GlobalComConfig` (its ``region_tokens``, else :data:`DEFAULT_REGION_TOKENS`)."""
    return int(getattr(config, "region_tokens", None) or DEFAULT_REGION_TOKENS)


def qwen_image_ratio(config: Any, num_tokens: int) -> float:
    """R of one image of ``num_tokens = H * W`` merged tokens: ``ratio`` (or the largest R whose count fits
    ``max_image_tokens``), raised where needed so that the image keeps one token."""
    return native_ratio(num_tokens, float(config.image_ratio(0, num_tokens)))


def qwen_num_image_tokens(config: Any, num_tokens: int) -> int:
    """``<|image_pad|>`` tokens of one image of ``num_tokens = H * W`` merged tokens in budget mode."""
    return native_num_tokens(num_tokens, qwen_image_ratio(config, num_tokens))


def plan_native_batch(
    features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], config: Any
) -> list[tuple[Plan, torch.Tensor]]:
    """Plan the images of one call from their merged-token features, one vectorised selection for all.

    Args:
        features: per image ``(H*W, D)`` in raster order.
        grids: per image ``(H, W)``.
        config: a :class:`~globalcom2.GlobalComConfig` (budget mode).

    Returns:
        ``(plan, index)`` per image; ``index`` (ascending) picks the kept rows of the image's features. Nothing is
        read from the device: every count comes from the geometry.
    """
    g = region_tokens_of(config)
    ratios = [qwen_image_ratio(config, h * w) for h, w in grids]
    built = [
        native_selection_input(f, grid, g, r) for f, grid, r in zip(features, grids, ratios, strict=True)
    ]
    images = [b[0] for b in built]
    selections = select_images(images, **config.selection_options)
    kept = kept_crop_tokens(images, selections, "budget")
    out = []
    for (_, layout), sel, (h, w), ratio, count in zip(built, selections, grids, ratios, kept, strict=True):
        keep = layout.from_table(sel.crop_keep)  # (H, W) kept tokens
        index = true_indices(keep.reshape(-1), count)
        device = keep.device
        plan = Plan(
            grid=region_grid(h, w, g),
            thumbnail_mask=torch.zeros(pooled_shape(h, w, g), dtype=torch.bool, device=device),
            crops_mask=keep,
            crop_ratios=sel.crop_ratios,
            num_tokens=count,
            num_tokens_full=h * w,
            valid_box=(0, h, 0, w),
            crop_keep_counts=sel.crop_keep_counts,
            crop_valid_counts=sel.crop_valid_counts,
            mode="budget",
            thumbnail_order=torch.zeros(0, dtype=torch.long, device=device),
            ratio=ratio,
        )
        out.append((plan, index))
    return out


def expand_kept_tokens(
    input_ids: torch.Tensor,
    token_types: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep_masks: Sequence[torch.Tensor],
    keep_counts: Sequence[int],
    row_image_tokens: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put every dropped image token back into a compressed batch, to compute uncompressed positions on it.

    Image tokens (``token_types == 1``) are the kept tokens of the images in row-major order (how HF scatters
    them). In the expanded rows every kept token sits at its place in its image's full run; the dropped tokens
    around it are copies of it (same id, type and attention). Rows are left-padded (attention 0) to one length.

    Args:
        input_ids, token_types: ``(B, L)`` (``mm_token_type_ids``: 0 text, 1 image, 2 video).
        attention_mask: ``(B, L)`` or None.
        keep_masks: per image, in order, Bool over its full ``H*W`` run.
        keep_counts: per image its kept tokens (host ints; at least one).
        row_image_tokens: image tokens of every row (host ints).

    Returns:
        ``(ids, types, attention, where, added)``: the expanded ``(B, L')`` tensors, ``where`` Long ``(B, L)`` the
        expanded index of every compressed token, ``added`` Long ``(B,)`` tokens put back in every row.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    counts = [int(c) for c in row_image_tokens]
    is_img = token_types == 1
    full_index = [true_indices(m.reshape(-1), k) for m, k in zip(keep_masks, keep_counts, strict=True)]
    # Every kept token spans the dropped tokens before it (gap) and, the last one of its image, those after it.
    gaps, spans = [], []
    for idx, m in zip(full_index, keep_masks, strict=True):
        prev = torch.cat([idx.new_full((1,), -1), idx[:-1]])
        gap = idx - prev - 1
        tail = torch.zeros_like(gap)
        tail[-1:] = m.numel() - 1 - idx[-1:]
        gaps.append(gap)
        spans.append(1 + gap + tail)
    span = torch.ones(batch, length, dtype=torch.long, device=device)
    offset = torch.zeros(batch, length, dtype=torch.long, device=device)
    if spans:
        span = span.masked_scatter(is_img, torch.cat(spans).to(device))
        offset = offset.masked_scatter(is_img, torch.cat(gaps).to(device))
    # Tokens put back per row, from the images each row holds (rows hold whole images, in order).
    full_counts = [int(m.numel()) for m in keep_masks]
    kept_counts = [int(k) for k in keep_counts]
    added, image = [], 0
    for c in counts:
        extra = 0
        while c > 0:
            c -= kept_counts[image]
            extra += full_counts[image] - kept_counts[image]
            image += 1
        added.append(extra)
    width = length + max(added, default=0)
    pad = torch.tensor([width - length - a for a in added], dtype=torch.long, device=device)
    starts = pad[:, None] + torch.cumsum(span, -1) - span
    total = batch * length + sum(added)
    flat_span = span.reshape(-1)
    source = torch.repeat_interleave(
        torch.arange(batch * length, device=device), flat_span, output_size=total
    )
    first = torch.cumsum(flat_span, 0) - flat_span
    within = torch.arange(total, device=device) - torch.repeat_interleave(first, flat_span, output_size=total)
    rows = torch.arange(batch, device=device)[:, None] * width
    dest = (starts + rows).reshape(-1)[source] + within

    def spread(x: torch.Tensor, fill: int) -> torch.Tensor:
        out = x.new_full((batch * width,), fill)
        return out.index_copy(0, dest, x.reshape(-1)[source]).reshape(batch, width)

    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    ids = spread(input_ids, 0)
    return (
        ids, spread(token_types, 0), spread(mask, 0), starts + offset,
        torch.tensor(added, dtype=torch.long, device=device),
    )  # fmt: skip


class QwenAdapter(FamilyAdapter):
    """GlobalCom² for ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (the parent of the other Qwen
    families, which differ only in their class names and in Qwen3-VL's deepstack features)."""

    family = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    processor_class_name = "Qwen2VLProcessor"
    encodes_first = True  # the kept sets must be known before generate computes the M-RoPE positions
    supports_max_image_tokens = True
    vision_tower_name = "visual"
    token_layout = "<|image_pad|> tokens"
    layout_label = "the <|vision_start|>/<|vision_end|> markers not counted"

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        super().__init__(model, processor, config)
        self.merge = int(model.config.vision_config.spatial_merge_size)
        self._warned_video = False

    def describe_tower(self, tower: Any) -> TowerInfo:
        return TowerInfo(type(tower).__name__, None, None, None, None, 0, 0, False)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        if self.config.mode != "budget":
            raise UnsupportedModelError(
                f"mode={self.config.mode!r} is not defined for {self.model_class_name}: there is no official "
                "GlobalCom² code for native-resolution models to reproduce; use mode='budget' (the default)"
            )

    def check_processor(self) -> None:
        merge = int(getattr(self.processor.image_processor, "merge_size", self.merge))
        if merge != self.merge:
            from .errors import IncompatibleProcessorError

            raise IncompatibleProcessorError(
                f"processor/model mismatch: merge_size {merge} vs spatial_merge_size {self.merge}"
            )

    # -- scoring: Eq. 7 on the merger's output, computed in after_encode (no hooks) ----------------------------
    def install_scoring(self, handle: GlobalComHandle) -> None:
        return None

    def install_family(self, handle: GlobalComHandle) -> None:
        inner = self.inner
        handle.patch(inner, "get_rope_index", self._rope_index(handle, inner.get_rope_index))

    def _encoding(self, handle: GlobalComHandle, original: Callable) -> Callable:
        wrapped = super()._encoding(handle, original)

        @functools.wraps(original)  # generate() reads this signature to pick the encoder's inputs
        def get_image_features(pixel_values: Any = None, image_grid_thw: Any = None, **kwargs: Any) -> Any:
            return wrapped(pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs)

        return get_image_features

    def pop_encode_inputs(self, kwargs: dict) -> dict:
        extra = {"grid_thw": kwargs.get("image_grid_thw"), "return_dict": kwargs.pop("return_dict", None)}
        kwargs["return_dict"] = True
        return extra

    def after_encode(self, handle: GlobalComHandle, out: Any, extra: dict) -> Any:
        grid_thw = extra["grid_thw"]
        grids = []
        for t, h, w in grid_thw.tolist():  # host ints (HF reads them too, to split the features)
            if int(t) != 1:
                raise ValueError(f"GlobalCom²: an image grid must have t = 1, got image_grid_thw {(t, h, w)}")
            grids.append((int(h) // self.merge, int(w) // self.merge))
        deepstack = getattr(out, "deepstack_features", None)
        out.pooler_output, deepstack = self._select(handle, tuple(out.pooler_output), deepstack, grids)
        if deepstack is not None:
            out.deepstack_features = deepstack
        return out if extra["return_dict"] is not False else out.to_tuple()

    def _select(
        self, handle: GlobalComHandle, features: tuple, deepstack: list | None, grids: list[tuple[int, int]]
    ) -> tuple[tuple, list | None]:
        """Plan the images of one encode; their selected rows, in the image features and (Qwen3-VL) in every
        deepstack layer, one row per image token."""
        planned = self.plan_images(list(features), grids)
        # index_select copies whole rows (memcpy); advanced indexing f[index] goes element by element and takes
        # ~5x longer on a CPU for these wide rows (same values)
        kept = tuple(f.index_select(0, index) for f, (_, index) in zip(features, planned, strict=True))
        if deepstack is not None:
            deepstack = [
                tuple(f.index_select(0, index) for f, (_, index) in zip(layer, planned, strict=True))
                for layer in deepstack
            ]
        handle.publish([plan for plan, _ in planned])
        return kept, deepstack

    def plan_images(
        self, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[Plan, torch.Tensor]]:
        """Plan the images of one call from their merged-token features (:func:`plan_native_batch`)."""
        return plan_native_batch(features, grids, self.config)

    # -- processor side ----------------------------------------------------------------------------------------
    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        self.patch_placeholder_counts(handle)

    def num_image_tokens(self, height: int, width: int) -> int:
        """``<|image_pad|>`` tokens of one image whose merged-token grid is ``height x width``."""
        return qwen_num_image_tokens(self.config, height * width)

    def ratio_for_image(self, height: int, width: int) -> float:
        return qwen_image_ratio(self.config, height * width)

    def _replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        _, h, w = (int(v) for v in image_inputs["image_grid_thw"][image_idx])
        return str(self.processor.image_token) * self.num_image_tokens(h // self.merge, w // self.merge)

    def merged_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` merged tokens the processor makes of a ``height x width`` image (HF's ``smart_resize``)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip: Any = self.processor.image_processor
        factor = int(ip.patch_size) * self.merge
        size = ip.size
        h, w = smart_resize(
            height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
        )
        return h // factor, w // factor

    def _num_multimodal_tokens(self, original: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
        out = original(image_sizes=image_sizes, **kwargs)
        patches = getattr(out, "num_image_patches", None)
        if patches is not None and image_sizes is not None:
            grids = [self.merged_grid(int(h), int(w)) for h, w in image_sizes]
            merged = [int(p) // self.merge**2 for p in patches]
            if [h * w for h, w in grids] == merged:
                out.num_image_tokens = [self.num_image_tokens(h, w) for h, w in grids]
            elif type(self).num_image_tokens is QwenAdapter.num_image_tokens:  # the count needs H*W only
                out.num_image_tokens = [qwen_num_image_tokens(self.config, n) for n in merged]
            else:  # e.g. per-call size options this reading of the processor's defaults does not see
                raise RuntimeError("GlobalCom²: cannot recover the merged-token grids of these image sizes")
        return out

    # -- model side: encode first, then positions from the kept sets -------------------------------------------
    @contextmanager
    def call_context(self, handle: GlobalComHandle, kwargs: dict) -> Iterator[None]:
        if kwargs.get("pixel_values_videos") is not None and not self._warned_video:
            warnings.warn(
                f"GlobalCom²: {self.model_class_name} videos are passed to the LLM uncompressed (images are "
                "compressed)",
                stacklevel=4,
            )
            self._warned_video = True
        yield

    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        outputs = {
            "image": self.inner.get_image_features(
                kwargs.pop("pixel_values"), kwargs.get("image_grid_thw"), return_dict=True
            )
        }
        videos = kwargs.pop("pixel_values_videos", None)
        if videos is not None:  # HF refuses raw video pixels beside pre-computed image features
            outputs["video"] = self.inner.get_video_features(
                videos, kwargs.get("video_grid_thw"), return_dict=True
            )
        return outputs

    def resize_placeholders(
        self, input_ids: torch.Tensor, plans: list[Any], extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"input_ids": input_ids, **extra}  # budget mode: the processor already emitted the counts

    def _rope_index(self, handle: GlobalComHandle, original: Callable) -> Callable:
        @functools.wraps(original)
        def get_rope_index(
            input_ids: torch.Tensor, mm_token_type_ids: Any = None, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            plans = handle.state.plans or []
            if mm_token_type_ids is None or not plans or kwargs.get("image_grid_thw") is None:
                return original(input_ids, mm_token_type_ids, *args, **kwargs)
            attention_mask = kwargs.pop("attention_mask", None)
            is_img = mm_token_type_ids == 1
            if attention_mask is not None:
                is_img = is_img & attention_mask.bool()
            rows = is_img.sum(-1).tolist()  # the one host read (HF's own rule reads every token type)
            kept, full = sum(p.num_tokens for p in plans), sum(p.num_tokens_full for p in plans)
            if sum(rows) == full and kept != full:
                return original(input_ids, mm_token_type_ids, *args, attention_mask=attention_mask, **kwargs)
            if sum(rows) != kept:
                raise PlaceholderMismatchError(
                    f"GlobalCom²: the prompts hold {sum(rows)} image tokens but this call's images keep {kept} "
                    "(uncompressed: {full}); build the inputs with the processor patched by this apply()"
                )
            ids, types, mask, where, added = expand_kept_tokens(
                input_ids,
                mm_token_type_ids,
                attention_mask,
                [p.crops_mask for p in plans],
                [p.num_tokens for p in plans],
                rows,
            )
            positions, deltas = original(ids, types, *args, attention_mask=mask, **kwargs)
            positions = positions.gather(
                2, where[None].expand(positions.shape[0], -1, -1).to(positions.device)
            )
            return positions, deltas + added.to(deltas.device)[:, None]

        return get_rope_index

    # -- vision side only ----------------------------------------------------------------------------------------
    def plan_for_image(self, handle: GlobalComHandle, image: Any) -> Plan:
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.no_grad():
            self.inner.get_image_features(pixel_values, inputs["image_grid_thw"])
        return handle.state.plans[0]  # type: ignore[index]

    @staticmethod
    def render_plan(model: Any, image: Any, plan: Plan, title: str, out_path: Any = None) -> Any:
        """The overlay of a native-resolution plan: virtual global view and regions with kept tokens
        (:func:`globalcom2.viz.native.render_native_overlay`)."""
        from ..viz.native import native_token_px, render_native_overlay

        return render_native_overlay(
            image, plan, token_px=native_token_px(model), title=title, out_path=out_path
        )


@register_adapter
class Qwen2VLAdapter(QwenAdapter):
    """GlobalCom² for ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor``."""


@register_adapter
class Qwen2_5_VLAdapter(QwenAdapter):  # noqa: N801  (named after the model class)
    """GlobalCom² for ``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor`` (window attention in the
    tower; the selection reads the merger's output, in raster order after HF undoes the window order)."""

    family = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name = "Qwen2_5_VLProcessor"


def kept_deepstack_rows(
    visual_pos_masks: torch.Tensor, origin: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a pruned sequence's visual tokens are and which deepstack rows they take.

    Args:
        visual_pos_masks: Bool ``(B, S)`` the visual positions of the full sequence (one deepstack row each, in
            row-major order).
        origin: Long ``(B, L)`` each entry's index in the full sequence (-1: an inserted token, which has none).
        valid: Bool ``(B, L)`` real entries (not fillers).

    Returns:
        ``(mask, rows)``: Bool ``(B, L)`` the kept visual entries, Long ``(M,)`` their deepstack rows (row-major).
    """
    b, s = visual_pos_masks.shape
    rank = (torch.cumsum(visual_pos_masks.reshape(-1).long(), 0) - 1).reshape(b, s)
    at = origin.clamp_min(0).to(visual_pos_masks.device)
    mask = valid.to(at.device) & (origin.to(at.device) >= 0) & visual_pos_masks.gather(1, at)
    return mask, rank.gather(1, at)[mask]


@register_adapter
class Qwen3VLAdapter(QwenAdapter):
    """GlobalCom² for ``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor`` (deepstack features trimmed with
    the image features)."""

    family = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    processor_class_name = "Qwen3VLProcessor"

    def install_pruner_hooks(self, handle: GlobalComHandle, pruner: Any) -> None:
        """DeepStack adds a visual feature to every visual position after each of the LLM's first layers; once an
        LLM-side method drops image tokens there, the kept ones get their own rows
        (:func:`kept_deepstack_rows`), a dropped token none (it left the sequence), an inserted one none (it has
        no position of the image). Wraps the language model's ``_deepstack_process`` on the instance."""
        lm = pruner.lm
        original = lm._deepstack_process

        @functools.wraps(original)
        def deepstack_process(hidden_states: Any, visual_pos_masks: Any, visual_embeds: Any) -> Any:
            entries = pruner.pruned_entries()
            if entries is None or visual_pos_masks is None:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            mask, rows = kept_deepstack_rows(visual_pos_masks, entries["origin"], entries["valid"])
            return original(hidden_states, mask, visual_embeds[rows.to(visual_embeds.device)])

        handle.patch(lm, "_deepstack_process", deepstack_process)


@register_adapter
class Qwen3_5Adapter(QwenAdapter):  # noqa: N801  (named after the model class)
    """GlobalCom² for ``Qwen3_5ForConditionalGeneration`` + ``Qwen3VLProcessor`` (Qwen3-VL's vision stack without
    deepstack; hybrid linear/full attention LLM)."""

    family = "qwen3_5"
    model_class_name = "Qwen3_5ForConditionalGeneration"
    processor_class_name = "Qwen3VLProcessor"


ADAPTERS = (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter)
