"""vLLM out-of-tree models for the families with markers between crops: Idefics3 / SmolVLM and Gemma 3 with GlobalCom²
in budget mode (paper Eq. 2-7; the vLLM side of :mod:`globalcom2.adapters.idefics3` and
:mod:`globalcom2.adapters.gemma3`).

Idefics3 frames every crop's run of ``<image>`` tokens with text markers (``<fake_token_around_image><row_r_col_c>``,
the global image last behind ``<global-img>``). Budget mode fixes each image's *total* (markers + ``int(N*R) +
int(R*n*N)``, a function of the crop grid and R or T), but how the kept tokens split over the crops follows the scores
(Eq. 3-4), and vLLM writes the prompt before any encoding. So **the whole image span, markers included, comes from
the model's multimodal embedding**:

- the processor writes the span with the transformers adapter's provisional split
  (:meth:`~globalcom2.adapters.idefics3.Idefics3Adapter.emitted_runs`, the same prompt ids as
  :func:`globalcom2.apply`'s processor) and marks *every* position of it as embedding (``PromptUpdateDetails`` with
  ``is_embed=None``, vLLM 0.32 and 0.33 alike), so vLLM asks the model for one embedding per position; it hands the
  model each image's crop grid (``globalcom2_tile_grids``) and its layout with one placeholder per run
  (``globalcom2_layouts``: the processor's own layout, tokenised by its tokenizer);
- the model scores and selects with the transformers adapter's own planning
  (:meth:`~globalcom2.adapters.idefics3.Idefics3Adapter.plan_images`, i.e.
  :func:`~globalcom2.adapters.internvl.plan_internvl_batch`, on Eq. 7 scores summed per pixel-shuffle group:
  :func:`~globalcom2.adapters.internvl.merge_pool`), then widens each run of the layout to its crop's kept count and
  returns the span: marker rows from the LLM's embedding table, each crop's kept features after its marker
  (:func:`span_embeddings`). What the LLM reads is what the transformers adapter hands it after moving the markers.

The counting and planning pieces are the transformers adapter's, built without a model
(:meth:`~globalcom2.adapters.idefics3.Idefics3Adapter.without_model`): one count function, one selection.

Switched on per model (see docs/engines.md)::

    vllm serve HuggingFaceM4/Idefics3-8B-Llama3 --hf-overrides \\
      '{"architectures": ["GlobalCom2Idefics3ForConditionalGeneration"], "globalcom2": {"ratio": 0.25}}'

(``GlobalCom2SmolVLMForConditionalGeneration`` alike).

**Gemma 3** (``GlobalCom2Gemma3ForConditionalGeneration``): one tile per image (pan-and-scan off, Gemma 3's default);
an image that would get pan-and-scan crops is refused (HTTP 400). Gemma 3's LLM attends bidirectionally inside an
image run, which vLLM derives from the span's ``is_embed`` positions when the prompt is written: with score-dependent
crop runs the whole span would become one block. A single tile keeps its run behind ``<start_of_image>``, shrunk to
the budget count and marked by ``select_token_id``, so the block is exactly the kept run; the model returns the kept
tokens only (:attr:`MarkerModelMixin.globalcom_whole_span` False), chosen by
:meth:`~globalcom2.adapters.gemma3.Gemma3Adapter.plan_images` from Eq. 7 scores summed per 4x4 pooling group.

Per-request options work as on the other families
(:data:`~globalcom2.plugins.vllm_common.REQUEST_OPTIONS` in ``mm_processor_kwargs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..adapters.cohere2_vision import Cohere2VisionAdapter
from ..adapters.gemma3 import Gemma3Adapter
from ..adapters.idefics3 import Idefics3Adapter
from ..adapters.internvl import GRID_KEY, merge_pool, num_tiles
from ..adapters.llama4 import Llama4Adapter
from ..config import GlobalComConfig
from ..core.plan import Plan
from ..core.scores import cls_scores_from_qk, cosine_scores
from ..extras import MissingDependencyError, install_command

try:
    from vllm.config import VllmConfig
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.exceptions import VLLMValidationError
    from vllm.model_executor.models.cohere2_vision import (
        Cohere2VisionDummyInputsBuilder,
        Cohere2VisionForConditionalGeneration,
        Cohere2VisionMultiModalProcessor,
        Cohere2VisionProcessingInfo,
    )
    from vllm.model_executor.models.gemma3_mm import (
        Gemma3DummyInputsBuilder,
        Gemma3ForConditionalGeneration,
        Gemma3MultiModalProcessor,
        Gemma3ProcessingInfo,
    )
    from vllm.model_executor.models.idefics3 import (
        Idefics3DummyInputsBuilder,
        Idefics3ForConditionalGeneration,
        Idefics3ImagePixelInputs,
        Idefics3MultiModalProcessor,
        Idefics3ProcessingInfo,
    )
    from vllm.model_executor.models.mllama4 import (
        Llama4ForConditionalGeneration,
        Mllama4DummyInputsBuilder,
        Mllama4MultiModalProcessor,
        Mllama4ProcessingInfo,
    )
    from vllm.model_executor.models.smolvlm import SmolVLMForConditionalGeneration, SmolVLMProcessingInfo
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig
    from vllm.multimodal.parse import ImageProcessorItems, ImageSize
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.vllm_markers needs vLLM (>=0.32,<0.34): {install_command('vllm')}", name="vllm"
    ) from exc

from .vllm_common import (
    OPTIONS_KEY,
    RequestOptionsInfoMixin,
    RequestOptionsProcessorMixin,
    head_mean_across_ranks,
    image_options,
    options_from_config,
    plan_by_options,
    without_request_options,
)

#: Per-image field: the image's layout token ids with one placeholder per run (ragged: one 1-D tensor per image).
LAYOUT_KEY = "globalcom2_layouts"


def span_embeddings(
    layout: torch.Tensor,
    placeholder_id: int,
    run_counts: torch.Tensor,
    kept: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One image's whole prompt span as embeddings: its layout with each run widened to its kept count.

    Args:
        layout: ``(L,)`` token ids of the image's layout with one ``placeholder_id`` per run, in prompt order.
        run_counts: ``(runs,)`` kept tokens of each run, in prompt order.
        kept: ``(sum(run_counts), D)`` the kept features, run after run.
        embed: the LLM's token embedding (ids -> ``(n, D)``), for the marker rows.

    Returns:
        ``(L - runs + sum(run_counts), D)``: marker rows from ``embed``, each run's kept features in its place.
    """
    is_run = layout == placeholder_id
    if int(is_run.sum()) != run_counts.numel():
        raise RuntimeError(f"GlobalCom²: {run_counts.numel()} run counts for {int(is_run.sum())} runs")
    repeats = torch.ones_like(layout).masked_scatter(is_run, run_counts.to(layout))
    ids = layout.repeat_interleave(repeats)
    rows = is_run.repeat_interleave(repeats)
    out = embed(ids.to(kept.device)).to(kept.dtype)
    if int(rows.sum()) != kept.shape[0]:
        raise RuntimeError(f"GlobalCom²: {kept.shape[0]} kept tokens for runs of {int(rows.sum())}")
    return out.masked_scatter(rows.to(out.device).unsqueeze(-1), kept)


def cosine_encode(
    hidden: torch.Tensor, factor: int, project: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds (tiles, n_tok, D), scores (tiles, n_tok))`` of SigLIP-style towers (no [CLS]): the projector's
    output and Eq. 7 on its input (``hidden``: ``(tiles, patches, H)``, one row per patch), summed over each
    ``factor x factor`` group the projector merges into one token (:func:`~globalcom2.adapters.internvl.merge_pool`),
    as the transformers adapters' projector hook scores."""
    embeds = project(hidden)
    return embeds.reshape(hidden.shape[0], -1, embeds.shape[-1]), merge_pool(cosine_scores(hidden), factor)


def _as_list(value: Any) -> list[Any]:
    """A batched per-image field as a list (vLLM stacks equal shapes into one tensor, else hands a list)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else list(value.unbind(0))


# -- processing (API server side) ----------------------------------------------------------------------------------
class MarkerInfoMixin(RequestOptionsInfoMixin):
    """Processing-info side: the transformers adapter (without a model) counts each image under its options."""

    adapter_class: ClassVar[type[Idefics3Adapter]] = Idefics3Adapter
    get_hf_processor: Callable[..., Any]
    ctx: Any

    def globalcom_adapter(self, options: GlobalComConfig) -> Any:
        """The transformers adapter of these options for counting and layouts (one per options, cached)."""
        cache: dict[GlobalComConfig, Any] = self.__dict__.setdefault("_globalcom_adapters", {})
        if options not in cache:
            cache[options] = self.adapter_class.without_model(
                self.get_hf_config(), self.get_hf_processor(), options
            )
        return cache[options]

    def globalcom_grid(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object]
    ) -> tuple[int, int]:
        """(rows, cols) of crops of one image under the request's HF options; (1, 1): one tile."""
        raise NotImplementedError

    def globalcom_target(self) -> int:
        """The prompt token each image's span replaces."""
        return int(self.get_hf_config().image_token_id)

    def globalcom_update(self, grid: tuple[int, int], options: GlobalComConfig) -> Any:
        """One image's prompt update: its span, every position of it embedding (``is_embed=None``)."""
        return PromptUpdateDetails.from_seq(self.globalcom_span(grid, options))

    def globalcom_span(self, grid: tuple[int, int], options: GlobalComConfig) -> list[int]:
        """The prompt ids of one image's span: the layout with the adapter's provisional runs."""
        adapter = self.globalcom_adapter(options)
        placeholder = int(self.get_hf_config().image_token_id)
        counts = iter(adapter.emitted_runs(grid))
        out: list[int] = []
        for token in adapter.layout_ids(grid):
            out += [placeholder] * next(counts) if token == placeholder else [token]
        return out


class MarkerProcessorMixin(RequestOptionsProcessorMixin):
    """Multimodal-processor side: each image's grid and layout for the model, and its whole span as embedding."""

    info: Any

    def _globalcom_grids(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> list[tuple[int, int]]:
        images = mm_items.get_items("image", ImageProcessorItems)
        sizes = [images.get_image_size(i) for i in range(images.get_count())]
        return [self.info.globalcom_grid(image_width=s.width, image_height=s.height, mm_kwargs=hf_kwargs)
                for s in sizes]  # fmt: skip

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        images = mm_items.get("image")
        if isinstance(images, ImageProcessorItems) and images.get_count():
            grids = self._globalcom_grids(mm_items, hf_kwargs)
            adapter = self.info.globalcom_adapter(self.info.globalcom_options(hf_kwargs))
            processed[GRID_KEY] = torch.tensor(grids, dtype=torch.long)
            processed[LAYOUT_KEY] = [torch.tensor(adapter.layout_ids(g), dtype=torch.long) for g in grids]
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[GRID_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        fields[LAYOUT_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:  # fmt: skip
        options = self.info.globalcom_options(hf_processor_mm_kwargs)

        def replacement(item_idx: int) -> Any:
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_idx)
            grid = self.info.globalcom_grid(
                image_width=size.width, image_height=size.height, mm_kwargs=hf_processor_mm_kwargs
            )
            return self.info.globalcom_update(grid, options)

        return [
            PromptReplacement(
                modality="image", target=[self.info.globalcom_target()], replacement=replacement
            )
        ]


# -- the model -----------------------------------------------------------------------------------------------------
class MarkerModelMixin:
    """Model side: encode, score, plan with the transformers adapter, return each image's whole span."""

    adapter_class: ClassVar[type[Idefics3Adapter]] = Idefics3Adapter
    #: the model returns each image's whole span (markers too); False: its kept tokens only (one run per image)
    globalcom_whole_span: ClassVar[bool] = True
    #: the tower has a [CLS] token (Eq. 1 with importance "cls" / "auto"); False: SigLIP, Eq. 7 only
    globalcom_cls_tower: ClassVar[bool] = False
    config: Any
    globalcom_config: GlobalComConfig
    globalcom_importance: str
    globalcom_plans: list[Plan]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.globalcom_config = options_from_config(self.config)
        importance = self.globalcom_config.importance
        if importance == "cls" and not self.globalcom_cls_tower:
            raise ValueError(
                f"importance='cls' needs a vision tower with a [CLS] token; {type(self).__name__}'s SigLIP tower has "
                "none (use importance='cosine' or 'auto')"
            )
        self.globalcom_importance = "cls" if importance == "auto" and self.globalcom_cls_tower else importance
        self.globalcom_plans = []

    def _globalcom_encode(self, image_input: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(embeds (tiles, n_tok, H), scores (tiles, n_tok), tiles per image)`` of the pixel input."""
        raise NotImplementedError

    def _globalcom_embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The LLM's token embedding of ``ids`` (the marker rows of a span)."""
        return self.language_model.embed_input_ids(ids)  # type: ignore[attr-defined]

    def embed_multimodal(self, **kwargs: object) -> Any:
        grids, layouts, options = (
            kwargs.pop(GRID_KEY, None),
            kwargs.pop(LAYOUT_KEY, None),
            kwargs.pop(OPTIONS_KEY, None),
        )
        image_input = self._parse_and_validate_image_input(**kwargs)  # type: ignore[attr-defined]
        if image_input is None or image_input["type"] != "pixel_values" or grids is None or layouts is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        grid_list = [(int(r), int(c)) for r, c in torch.as_tensor(grids).reshape(-1, 2).tolist()]
        layout_list = [torch.as_tensor(x).reshape(-1) for x in _as_list(layouts)]
        embeds, scores, tiles = self._globalcom_encode(image_input)
        for grid, count in zip(grid_list, tiles, strict=True):
            if num_tiles(*grid) != count:
                raise RuntimeError(f"GlobalCom²: tile grid {grid} does not match {count} tiles")
        layouts_by_grid = {g: x.tolist() for g, x in zip(grid_list, layout_list, strict=True)}
        configs = image_options(options, len(grid_list), self.globalcom_config)
        tile_scores = list(scores.split(tiles))

        def plan(idx: list[int], cfg: GlobalComConfig) -> list[tuple[Plan, torch.Tensor, list[int]]]:
            adapter = self.adapter_class.without_model(self.config, None, cfg, layouts_by_grid)
            planned = adapter.plan_images([tile_scores[i] for i in idx], [grid_list[i] for i in idx])
            runs = adapter.placeholder_run_counts([p for p, _ in planned])  # one host read for the group
            out, start = [], 0
            for i, (p, index) in zip(idx, planned, strict=True):
                n = num_tiles(*grid_list[i])
                out.append((p, index, runs[start : start + n]))
                start += n
            return out

        planned = plan_by_options(configs, plan)
        placeholder = int(self.config.image_token_id)
        spans = []
        for image, layout, (_, index, runs) in zip(embeds.split(tiles), layout_list, planned, strict=True):
            kept = image.reshape(-1, image.shape[-1])[index.to(image.device)]
            if not self.globalcom_whole_span:
                spans.append(kept)
                continue
            spans.append(
                span_embeddings(layout, placeholder, torch.tensor(runs), kept, self._globalcom_embed_tokens)
            )
        self.globalcom_plans = [p for p, _, _ in planned]
        return tuple(spans)


# -- Idefics3 / SmolVLM ----------------------------------------------------------------------------------------------
class GlobalComIdefics3ProcessingInfo(MarkerInfoMixin, Idefics3ProcessingInfo):
    """vLLM's Idefics3 processing info with the budget-mode span (markers + kept tokens) per image."""

    def globalcom_grid(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object]
    ) -> tuple[int, int]:
        _, rows, cols = self._get_image_feature_grid_size(
            image_width=image_width, image_height=image_height, processor=self.get_hf_processor(),
            mm_kwargs=without_request_options(mm_kwargs),
        )  # fmt: skip
        return max(int(rows), 1), max(int(cols), 1)  # (0, 0): the global image alone

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any,
                             mm_kwargs: Mapping[str, object]) -> int:  # fmt: skip
        grid = self.globalcom_grid(image_width=image_width, image_height=image_height, mm_kwargs=mm_kwargs)
        return len(self.globalcom_span(grid, self.globalcom_options(mm_kwargs)))


class GlobalComSmolVLMProcessingInfo(GlobalComIdefics3ProcessingInfo, SmolVLMProcessingInfo):
    """:class:`GlobalComIdefics3ProcessingInfo` on SmolVLM's processor."""


class GlobalComIdefics3MultiModalProcessor(MarkerProcessorMixin, Idefics3MultiModalProcessor):
    """vLLM's Idefics3 / SmolVLM processor: each image's whole span is the model's embedding."""


class Idefics3MarkerMixin(MarkerModelMixin):
    """Idefics3 / SmolVLM encoding: the tower's output (the connector's input) is scored by Eq. 7, summed per
    pixel-shuffle group, as the transformers adapter's connector hook does."""

    model: Any
    supports_encoder_cudagraph = False  # the span is not the tower's output shape

    def _globalcom_encode(self, image_input: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        assert isinstance(image_input, Idefics3ImagePixelInputs)
        hidden = self.model.image_pixels_to_features(
            image_input["pixel_values"], pixel_attention_mask=image_input["pixel_attention_mask"]
        )
        embeds, scores = cosine_encode(hidden, int(self.config.scale_factor), self.model.connector)
        return embeds, scores, [int(n) for n in image_input["num_patches"].tolist()]

    def _globalcom_embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(ids)


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComIdefics3MultiModalProcessor,
    info=GlobalComIdefics3ProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class GlobalComIdefics3ForConditionalGeneration(Idefics3MarkerMixin, Idefics3ForConditionalGeneration):
    """vLLM's Idefics3 with GlobalCom² (budget mode): each image's span is its markers and kept tokens."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComIdefics3MultiModalProcessor,
    info=GlobalComSmolVLMProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class GlobalComSmolVLMForConditionalGeneration(Idefics3MarkerMixin, SmolVLMForConditionalGeneration):
    """vLLM's SmolVLM with GlobalCom² (budget mode), as :class:`GlobalComIdefics3ForConditionalGeneration`."""


# -- Gemma 3 -------------------------------------------------------------------------------------------------------
class GlobalComGemma3ProcessingInfo(MarkerInfoMixin, Gemma3ProcessingInfo):
    """vLLM's Gemma 3 processing info: one tile per image (pan-and-scan crops refused), its run at the budget count."""

    adapter_class = Gemma3Adapter

    def globalcom_grid(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object]
    ) -> tuple[int, int]:
        crops = self.get_num_crops(
            image_width=image_width, image_height=image_height, processor=self.get_hf_processor(),
            mm_kwargs=without_request_options(mm_kwargs),
        )  # fmt: skip
        if crops:
            raise VLLMValidationError(
                f"GlobalCom² on Gemma 3 in vLLM compresses an image as one tile; this {image_width}x{image_height} "
                f"image gets {crops} pan-and-scan crops (do_pan_and_scan=True): vLLM fixes Gemma 3's bidirectional "
                "image blocks when the prompt is written, before the scores split the kept tokens over the crops. "
                "Send do_pan_and_scan=False (the default)",
                parameter="mm_processor_kwargs.do_pan_and_scan",
            )
        return 1, 1

    def globalcom_target(self) -> int:
        processor = self.get_hf_processor()
        return int(processor.tokenizer.convert_tokens_to_ids(processor.boi_token))

    def globalcom_update(self, grid: tuple[int, int], options: GlobalComConfig) -> Any:
        # Only the run is embedding: vLLM's bidirectional image block is exactly the shrunken run.
        return PromptUpdateDetails.select_token_id(
            self.globalcom_span(grid, options), int(self.get_hf_config().image_token_id)
        )

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any,
                             mm_kwargs: Mapping[str, object]) -> int:  # fmt: skip
        grid = self.globalcom_grid(image_width=image_width, image_height=image_height, mm_kwargs=mm_kwargs)
        return int(self.globalcom_adapter(self.globalcom_options(mm_kwargs)).num_image_tokens_for_grid(grid))

    def get_image_size_with_most_features(self) -> ImageSize:
        size = int(self.get_hf_config().vision_config.image_size)  # one tile: every size gives the same count
        return ImageSize(width=size, height=size)


class GlobalComGemma3MultiModalProcessor(MarkerProcessorMixin, Gemma3MultiModalProcessor):
    """vLLM's Gemma 3 processor (newline merging included) with the budget-mode run per image."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComGemma3MultiModalProcessor,
    info=GlobalComGemma3ProcessingInfo,
    dummy_inputs=Gemma3DummyInputsBuilder,
)
class GlobalComGemma3ForConditionalGeneration(MarkerModelMixin, Gemma3ForConditionalGeneration):
    """vLLM's Gemma 3 with GlobalCom² (budget mode): each image's run holds its kept tokens (Eq. 7 on the SigLIP
    patches, summed per pooling group; a lone tile keeps its top int(N*R) by the thumbnail rule)."""

    adapter_class = Gemma3Adapter
    globalcom_whole_span = (
        False  # the run only: the markers stay prompt tokens, the run stays one image block
    )
    supports_encoder_cudagraph = False

    def _globalcom_encode(self, image_input: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        hidden = self.vision_tower(image_input["pixel_values"])  # the projector's input
        factor = self.adapter_class.without_model(
            self.config, None, self.globalcom_config
        ).factor  # 4x4 pooling
        embeds, scores = cosine_encode(hidden, factor, self.multi_modal_projector)
        return embeds, scores, [int(n) for n in image_input["num_patches"].tolist()]


# -- Llama 4 and Cohere2 Vision: tiles + a global tile / thumbnail last, markers around the runs ---------------------
class TiledMarkerInfoMixin(MarkerInfoMixin):
    """Processing info of the families whose transformers adapter finds the tile grid from the image size
    (:meth:`~globalcom2.adapters.idefics3.Idefics3Adapter.grid_for_image`): the whole span per image, as Idefics3."""

    def globalcom_grid(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object]
    ) -> tuple[int, int]:
        adapter = self.globalcom_adapter(
            self.globalcom_server_options
        )  # the grid does not depend on the budget
        return tuple(adapter.grid_for_image(image_height, image_width))  # type: ignore[return-value]


class GlobalComLlama4ProcessingInfo(TiledMarkerInfoMixin, Mllama4ProcessingInfo):
    """vLLM's Llama 4 processing info with the budget-mode span (separators + kept tokens) per image."""

    adapter_class = Llama4Adapter

    def globalcom_target(self) -> int:
        return int(self.get_hf_processor().image_token_id)  # the user's <|image|>; the runs hold <|patch|>


class GlobalComLlama4MultiModalProcessor(MarkerProcessorMixin, Mllama4MultiModalProcessor):
    """vLLM's Llama 4 processor: each image's whole span is the model's embedding."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComLlama4MultiModalProcessor,
    info=GlobalComLlama4ProcessingInfo,
    dummy_inputs=Mllama4DummyInputsBuilder,
)
class GlobalComLlama4ForConditionalGeneration(MarkerModelMixin, Llama4ForConditionalGeneration):
    """vLLM's Llama 4 with GlobalCom² (budget mode): each image's span is its tile separators and kept tokens.

    Scores: Eq. 1 from the last vision layer's own rotated q and k (its class embedding sits *last* in each tile's
    sequence and is moved first for :func:`~globalcom2.core.scores.cls_scores_from_qk`), head mean across
    tensor-parallel ranks, summed per pixel-shuffle group; ``importance="cosine"``: Eq. 7 on ``vision_adapter``'s
    input, summed alike (the transformers adapter's rules)."""

    adapter_class = Llama4Adapter
    globalcom_cls_tower = True
    supports_encoder_cudagraph = False  # the span is not the tower's output shape

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        compilation = vllm_config.compilation_config
        if getattr(compilation, "cudagraph_mm_encoder", False) or getattr(
            compilation, "compile_mm_encoder", False
        ):
            raise ValueError(
                "GlobalCom² on Llama 4 reads the vision tower's last layer during the encode and returns each "
                "image's span from embed_multimodal: run it without cudagraph_mm_encoder / compile_mm_encoder"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _globalcom_encode(self, image_input: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        recorded: list[torch.Tensor] = []
        tower = self.vision_model
        factor = int(round(1 / float(self.config.vision_config.pixel_shuffle_ratio)))
        if self.globalcom_importance == "cosine":

            def cosine(_module: Any, args: tuple) -> None:
                recorded.append(merge_pool(cosine_scores(args[0]), factor))

            hook = tower.vision_adapter.register_forward_pre_hook(cosine)
        else:
            att = tower.model.layers[-1].self_attn
            kind = self.globalcom_config.score

            def cls(_module: Any, args: tuple) -> None:
                # the layer's rotated q, k as its attention gets them: (tiles, patches + 1, local heads * head_dim),
                # [CLS] last; moved first for the shared Eq. 1 code
                q, k = (torch.cat([x[:, -1:], x[:, :-1]], dim=1) for x in args[:2])
                local = cls_scores_from_qk(q[:, :1], k, num_heads=att.num_local_heads, kind=kind)
                if att.tp_size > 1:
                    local = head_mean_across_ranks(
                        local, att.num_local_heads, att.num_heads, tensor_model_parallel_all_reduce
                    )
                recorded.append(merge_pool(local, factor))

            hook = att.attn.register_forward_pre_hook(cls)  # the rotary module is shared by the layers
        # vLLM 0.32's patch embedding hands its linear a permuted (non-contiguous) view, which the CPU build's oneDNN
        # GEMM refuses for a batch of one tile (stock vLLM fails on such an image): a contiguous copy, same values.
        contiguous = tower.patch_embedding.linear.register_forward_pre_hook(
            lambda _module, args: (args[0].contiguous(), *args[1:])
        )
        try:  # every rank encodes every tile (no data-parallel sharding): the same scores and plan everywhere
            embeds = self.encode_image_chunks(image_input["pixel_values"], use_data_parallel=False)
        finally:
            hook.remove()
            contiguous.remove()
        return embeds, recorded[0], [int(n) for n in image_input["patches_per_image"].tolist()]


class GlobalComCohere2VisionProcessingInfo(TiledMarkerInfoMixin, Cohere2VisionProcessingInfo):
    """vLLM's Cohere2 Vision processing info with the budget-mode span (line breaks + kept tokens) per image."""

    adapter_class = Cohere2VisionAdapter


class GlobalComCohere2VisionMultiModalProcessor(MarkerProcessorMixin, Cohere2VisionMultiModalProcessor):
    """vLLM's Cohere2 Vision processor: each image's whole span is the model's embedding."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComCohere2VisionMultiModalProcessor,
    info=GlobalComCohere2VisionProcessingInfo,
    dummy_inputs=Cohere2VisionDummyInputsBuilder,
)
class GlobalComCohere2VisionForConditionalGeneration(MarkerModelMixin, Cohere2VisionForConditionalGeneration):
    """vLLM's Cohere2 Vision with GlobalCom² (budget mode): each image's span is its line breaks and kept tokens
    (Eq. 7 on the SigLIP2 tower's output, summed per pixel-shuffle group)."""

    adapter_class = Cohere2VisionAdapter

    def _globalcom_encode(self, image_input: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        hidden = self.vision_tower(image_input["pixel_values"])  # the projector's input
        embeds, scores = cosine_encode(hidden, int(self.config.downsample_factor), self.multi_modal_projector)
        return embeds, scores, [int(n) for n in image_input["num_patches"].tolist()]


__all__ = [
    "LAYOUT_KEY",
    "GlobalComCohere2VisionForConditionalGeneration",
    "GlobalComCohere2VisionMultiModalProcessor",
    "GlobalComCohere2VisionProcessingInfo",
    "GlobalComGemma3ForConditionalGeneration",
    "GlobalComGemma3MultiModalProcessor",
    "GlobalComGemma3ProcessingInfo",
    "GlobalComIdefics3ForConditionalGeneration",
    "GlobalComIdefics3MultiModalProcessor",
    "GlobalComIdefics3ProcessingInfo",
    "GlobalComLlama4ForConditionalGeneration",
    "GlobalComLlama4MultiModalProcessor",
    "GlobalComLlama4ProcessingInfo",
    "GlobalComSmolVLMForConditionalGeneration",
    "GlobalComSmolVLMProcessingInfo",
    "cosine_encode",
    "span_embeddings",
]
