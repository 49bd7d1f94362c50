"""vLLM out-of-tree models: Qwen2-VL, Qwen2.5-VL and Qwen3-VL with GlobalCom² in budget mode (paper Eq. 2-7).

The rule is the transformers adapter's (:mod:`globalcom2.adapters.qwen`, docs/qwen.md): regions of at most G x G
merged tokens, a virtual global view pooled from the image's own tokens, Eq. 7 on the merger's output, and the one
selection :func:`~globalcom2.adapters.qwen.plan_native_batch` (the same call as the adapter). What this module adds to
vLLM's own model classes follows the way vLLM's own video pruning (EVS, ``vllm/multimodal/video_prune/evs.py``)
prunes a Qwen video:

- **Count in the processor.** Each image's ``<|image_pad|>`` run has ``int(R * H * W)`` tokens (at least one;
  :func:`~globalcom2.adapters.qwen.qwen_num_image_tokens`), a function of ``image_grid_thw`` and the request's budget
  (``ratio`` R or ``max_image_tokens``; per-request options as for the other families,
  :mod:`globalcom2.plugins.vllm_common`), as EVS's ``compute_retained_tokens_count`` sizes a video's run.
- **Positions travel with the embeddings.** As EVS appends each kept token's M-RoPE position to its embedding row
  (``compute_mrope_for_media``), the model appends the kept token's ``(row, col)`` in the image's merged grid as
  :data:`POSITION_COLUMNS` extra columns (each coordinate as two base-256 digits, exact in bf16), so they go through
  vLLM's encoder cache and chunked prefill with the rows they belong to.
- **Positions recomputed in the model.** ``get_mrope_input_positions`` runs vLLM's own rule on the prompt with every
  dropped token put back, so the text after an image keeps its uncompressed positions and decoding its uncompressed
  offset (``mrope_position_delta``); every kept image token starts at the image's ``(t, h, w)`` origin.
  ``embed_input_ids`` strips the columns and ``forward`` adds each kept token's ``(0, row, col)`` to its position:
  every kept token gets the position it has uncompressed. EVS recomputes in ``recompute_mrope_positions`` instead,
  but vLLM's runner calls that hook only while ``video_pruning_rate > 0`` (and its CPU runner never), so the shift
  lives in the model: one code path on every runner. The hand-over from ``embed_input_ids`` to ``forward`` is the
  per-forward state vLLM's Qwen3-VL already keeps for its deepstack features.
- **Qwen3-VL deepstack.** vLLM's Qwen3-VL tower returns the main and the deepstack features side by side in one row
  per merged token; Eq. 7 reads the main part (the merger's output), and keeping rows keeps exactly the kept tokens'
  deepstack features.
- **Videos** (and precomputed image embeddings) pass through uncompressed; their position columns are zero (videos:
  vLLM's own positions) or the full raster (embeddings).

Switched on per model::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides \\
      '{"architectures": ["GlobalCom2Qwen2_5_VLForConditionalGeneration"], "globalcom2": {"ratio": 0.25}}'

Refused with a reason (before any weight is loaded): ``importance="cls"`` (no [CLS] token), ``--video-pruning-rate``
(EVS's own position hook would read our columns as its own), pipeline parallelism (the position shift runs on the
first stage only) and a CUDA-graph mode that captures whole prefill batches (``FULL``: the shift is Python in
``forward``); vLLM's default ``FULL_AND_PIECEWISE`` captures decode batches only, which hold no image token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..adapters.qwen import plan_native_batch, qwen_num_image_tokens
from ..config import GlobalComConfig
from ..core.plan import Plan
from ..extras import MissingDependencyError, install_command

try:
    from vllm.config import CUDAGraphMode, VllmConfig
    from vllm.model_executor.models.qwen2_5_vl import (
        Qwen2_5_VLDummyInputsBuilder,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLMultiModalProcessor,
        Qwen2_5_VLProcessingInfo,
    )
    from vllm.model_executor.models.qwen2_vl import (
        Qwen2VLDummyInputsBuilder,
        Qwen2VLForConditionalGeneration,
        Qwen2VLMultiModalProcessor,
        Qwen2VLProcessingInfo,
    )
    from vllm.model_executor.models.qwen3_vl import (
        Qwen3VLDummyInputsBuilder,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMultiModalProcessor,
        Qwen3VLProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.parse import ImageProcessorItems
    from vllm.multimodal.processing import PromptReplacement
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.vllm_qwen needs vLLM (>=0.32,<0.34): {install_command('vllm')}", name="vllm"
    ) from exc

from .vllm_common import (
    OPTIONS_KEY,
    ImageOptionsInputMixin,
    RequestOptionsInfoMixin,
    RequestOptionsProcessorMixin,
    image_options,
    options_from_config,
    plan_by_options,
)

#: Extra columns appended to every image/video embedding row: row and column of the token in its image's merged
#: grid, each as two base-:data:`POSITION_DIGIT` digits (every digit < 256 is exact in bf16, fp16 and fp32).
POSITION_COLUMNS = 4
POSITION_DIGIT = 256


# -- counts (the processor and the model agree through these) ------------------------------------------------------
def native_image_tokens(
    options: GlobalComConfig, grid_thw: Sequence[int], merge: int, compress: bool = True
) -> int:
    """``<|image_pad|>`` tokens of one image with patch grid ``grid_thw = (1, h, w)``: ``int(R * H * W)`` (at least
    one) for ``H x W = (h / merge) x (w / merge)`` merged tokens, or ``H * W`` with ``compress=False``."""
    _, h, w = (int(v) for v in grid_thw)
    num_tokens = (h // merge) * (w // merge)
    return qwen_num_image_tokens(options, num_tokens) if compress else num_tokens


# -- positions -----------------------------------------------------------------------------------------------------
def position_columns(index: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n, 4)`` columns of kept tokens at raster ``index`` in a grid ``width`` tokens wide: row and column, each as
    two base-256 digits (high, low), in ``dtype``."""
    rows, cols = index // width, index % width
    digits = torch.stack(
        [rows // POSITION_DIGIT, rows % POSITION_DIGIT, cols // POSITION_DIGIT, cols % POSITION_DIGIT], dim=-1
    )
    return digits.to(dtype)


def shifted_positions(
    positions: torch.Tensor, is_multimodal: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """M-RoPE positions with every multimodal token moved by its ``(0, row, col)`` (from :func:`position_columns`).

    Args:
        positions: ``(3, P)`` the batch's positions (padded to ``P >= len(is_multimodal)``).
        is_multimodal: Bool ``(n,)`` the scheduled tokens that take a multimodal embedding.
        columns: ``(m, 4)`` one row per such token, in order.

    Returns:
        ``(3, P)`` new positions; text and padding unchanged. No host read.
    """
    digits = columns.round().long()
    rows = digits[:, 0] * POSITION_DIGIT + digits[:, 1]
    cols = digits[:, 2] * POSITION_DIGIT + digits[:, 3]
    source = torch.stack([torch.zeros_like(rows), rows, cols]).to(positions.device, positions.dtype)
    n = is_multimodal.shape[0]
    offsets = positions.new_zeros(3, n).masked_scatter(
        is_multimodal.to(positions.device)[None].expand(3, -1), source
    )
    return positions + torch.nn.functional.pad(offsets, (0, positions.shape[1] - n))


def expand_image_runs(
    input_tokens: Sequence[int], mm_features: Sequence[Any], merge: int, image_token_id: int
) -> tuple[list[int], list[Any], np.ndarray, int]:
    """The prompt with every compressed image run put back at its full ``H * W`` tokens.

    Args:
        input_tokens: the prompt as vLLM holds it (each image's run has its kept count).
        mm_features: vLLM's ``MultiModalFeatureSpec`` of the prompt's items.
        merge: the tower's spatial merge size.
        image_token_id: ``<|image_pad|>``.

    Returns:
        ``(tokens, features, where, added)``: the expanded prompt, the features with their offsets (and image run
        lengths) in it, ``where[j]`` the expanded index whose position prompt token ``j`` takes (an image's kept
        tokens all take its first token's, the image's origin), and the number of tokens put back.
    """
    tokens: list[int] = []
    features: list[Any] = []
    where = np.arange(len(input_tokens))
    shift, start = 0, 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        pos = feature.mm_position
        offset, length = int(pos.offset), int(pos.length)
        tokens += input_tokens[start:offset]
        new_offset = offset + shift
        if feature.modality == "image" and pos.is_embed is None:
            _, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
            full = (h // merge) * (w // merge)
            tokens += [image_token_id] * full
            where[offset : offset + length] = new_offset  # every kept token at the image's origin
            where[offset + length :] += full - length
            shift += full - length
            pos = dataclasses.replace(pos, offset=new_offset, length=full)
        else:
            tokens += input_tokens[offset : offset + length]
            pos = dataclasses.replace(pos, offset=new_offset)
        features.append(dataclasses.replace(feature, mm_position=pos))
        start = offset + length
    tokens += input_tokens[start:]
    return tokens, features, where, shift


# -- processing (API server side) ----------------------------------------------------------------------------------
class NativeProcessorMixin(RequestOptionsProcessorMixin):
    """Qwen processors: each image's ``<|image_pad|>`` run has the budget count of the request's options (videos and
    precomputed embeddings keep vLLM's own count)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:  # fmt: skip
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        options = self.info.globalcom_options(hf_processor_mm_kwargs)
        hf_config = self.info.get_hf_config()
        token_id = int(hf_config.image_token_id)
        merge = int(hf_config.vision_config.spatial_merge_size)

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            compress = isinstance(mm_items.get("image"), ImageProcessorItems)
            return [token_id] * native_image_tokens(options, grid, merge, compress)

        image = PromptReplacement(modality="image", target=[token_id], replacement=replacement)
        return [image if u.modality == "image" else u for u in updates]


class GlobalComQwen2VLProcessingInfo(RequestOptionsInfoMixin, Qwen2VLProcessingInfo):
    """vLLM's Qwen2-VL processing info; the most features any request may ask for are the uncompressed ones."""


class GlobalComQwen2VLMultiModalProcessor(NativeProcessorMixin, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor with the budget-mode image count."""


class GlobalComQwen2_5_VLProcessingInfo(RequestOptionsInfoMixin, Qwen2_5_VLProcessingInfo):  # noqa: N801
    """vLLM's Qwen2.5-VL processing info."""


class GlobalComQwen2_5_VLMultiModalProcessor(NativeProcessorMixin, Qwen2_5_VLMultiModalProcessor):  # noqa: N801
    """vLLM's Qwen2.5-VL processor with the budget-mode image count."""


class GlobalComQwen3VLProcessingInfo(RequestOptionsInfoMixin, Qwen3VLProcessingInfo):
    """vLLM's Qwen3-VL processing info."""


class GlobalComQwen3VLMultiModalProcessor(NativeProcessorMixin, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor with the budget-mode image count."""


# -- the models ----------------------------------------------------------------------------------------------------
class NativeGlobalComMixin(ImageOptionsInputMixin):
    """What the vLLM Qwen models with GlobalCom² add to vLLM's own class (module docstring): selection after the
    tower, position columns, positions of the uncompressed run."""

    config: Any
    visual: Any

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # vLLM reads `vllm_config` and `prefix` from this signature; the loader always passes both.
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self._globalcom_setup(vllm_config)

    def _globalcom_setup(self, vllm_config: VllmConfig) -> None:
        self.globalcom_config = options_from_config(self.config)
        if self.globalcom_config.importance == "cls":
            raise ValueError(
                f"importance='cls' needs a [CLS] token; {type(self).__name__}'s tower has none (use "
                "importance='auto' or 'cosine': Eq. 7)"
            )
        mm_config = vllm_config.model_config.get_multimodal_config()
        if (mm_config.video_pruning_rate or 0) > 0:
            raise ValueError(
                f"GlobalCom² on {type(self).__name__} does not combine with video pruning (video_pruning_rate="
                f"{mm_config.video_pruning_rate}): vLLM's EVS position hook would read GlobalCom²'s position columns; "
                "drop --video-pruning-rate (videos pass through uncompressed)"
            )
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "GlobalCom² on Qwen models needs pipeline_parallel_size=1: the kept tokens' positions are set where "
                f"the image embeddings are merged (the first stage), got {vllm_config.parallel_config.pipeline_parallel_size}"
            )
        cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
        if cudagraph_mode is not None and cudagraph_mode.mixed_mode() == CUDAGraphMode.FULL:
            raise ValueError(
                f"GlobalCom² on Qwen models needs prefill batches outside full CUDA graphs (cudagraph_mode="
                f"{cudagraph_mode.name}): use FULL_AND_PIECEWISE (vLLM's default), PIECEWISE or NONE"
            )
        self.globalcom_merge = int(self.config.vision_config.spatial_merge_size)
        self.globalcom_plans: list[Plan] = []  # plans of the last batch of images (inspection and tests)
        self._globalcom_pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- encoder: select, then append the kept tokens' grid positions ------------------------------------------
    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        merge = self.globalcom_merge
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in image_input["image_grid_thw"].tolist()]
        if (
            image_input.get("type") != "pixel_values"
        ):  # precomputed embeddings: nothing to score, passed whole
            return tuple(
                torch.cat(
                    [e, position_columns(torch.arange(e.shape[0], device=e.device), w, e.dtype)], dim=-1
                )
                for e, (_, w) in zip(embeds, grids, strict=True)
            )
        # Eq. 7 reads the merger's output (Qwen3-VL: the main features, before the deepstack ones).
        features = [e[:, : getattr(self, "visual_dim", None)] for e in embeds]
        configs = image_options(getattr(image_input, OPTIONS_KEY, None), len(grids), self.globalcom_config)
        planned = plan_by_options(configs, lambda idx, cfg: plan_native_batch(
            [features[i] for i in idx], [grids[i] for i in idx], cfg))  # fmt: skip
        out = []
        for e, (_, index), (_, w) in zip(embeds, planned, grids, strict=True):
            index = index.to(e.device)
            out.append(torch.cat([e[index], position_columns(index, w, e.dtype)], dim=-1))
        self.globalcom_plans = [plan for plan, _ in planned]
        return tuple(out)

    def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_video_input(video_input)  # type: ignore[misc]
        return tuple(torch.cat([e, e.new_zeros(e.shape[0], POSITION_COLUMNS)], dim=-1) for e in embeds)

    def get_encoder_cudagraph_config(self) -> Any:
        # vLLM's encoder CUDA graphs run the tower without embed_multimodal (no selection, no columns): off, as vLLM
        # does for its own pruning.
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        return dataclasses.replace(config, modalities=[])

    # -- LLM: strip the columns, shift the kept tokens' positions ----------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        self._globalcom_pending = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0 and is_multimodal is not None:
            columns = torch.cat([m[:, -POSITION_COLUMNS:] for m in multimodal_embeddings])
            multimodal_embeddings = [m[:, :-POSITION_COLUMNS] for m in multimodal_embeddings]
            self._globalcom_pending = (is_multimodal, columns)
        return super().embed_input_ids(  # type: ignore[misc]
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> Any:  # fmt: skip
        pending, self._globalcom_pending = self._globalcom_pending, None
        if pending is not None and inputs_embeds is not None and positions.ndim == 2:
            positions = shifted_positions(positions, *pending)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # type: ignore[misc]

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        """vLLM's positions of the prompt with every dropped token put back (:func:`expand_image_runs`): text keeps
        its uncompressed positions, each kept image token the image's origin (``forward`` adds its row and column),
        and the decoding offset grows by the tokens put back."""
        tokens, features, where, added = expand_image_runs(
            input_tokens, mm_features, self.globalcom_merge, int(self.config.image_token_id)
        )
        positions, delta = super().get_mrope_input_positions(tokens, features)  # type: ignore[misc]
        return positions[:, torch.from_numpy(where)], int(delta) + added


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComQwen2VLMultiModalProcessor,
    info=GlobalComQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class GlobalComQwen2VLForConditionalGeneration(NativeGlobalComMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with GlobalCom² (budget mode): each image's embeddings are its kept tokens."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComQwen2_5_VLMultiModalProcessor,
    info=GlobalComQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class GlobalComQwen2_5_VLForConditionalGeneration(  # noqa: N801
    NativeGlobalComMixin, Qwen2_5_VLForConditionalGeneration
):
    """vLLM's Qwen2.5-VL with GlobalCom² (budget mode; the tower's window order is undone before the selection)."""


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComQwen3VLMultiModalProcessor,
    info=GlobalComQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class GlobalComQwen3VLForConditionalGeneration(NativeGlobalComMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with GlobalCom² (budget mode; deepstack features kept for the kept tokens only)."""


__all__ = [
    "POSITION_COLUMNS",
    "GlobalComQwen2VLForConditionalGeneration",
    "GlobalComQwen2VLMultiModalProcessor",
    "GlobalComQwen2VLProcessingInfo",
    "GlobalComQwen2_5_VLForConditionalGeneration",
    "GlobalComQwen2_5_VLMultiModalProcessor",
    "GlobalComQwen2_5_VLProcessingInfo",
    "GlobalComQwen3VLForConditionalGeneration",
    "GlobalComQwen3VLMultiModalProcessor",
    "GlobalComQwen3VLProcessingInfo",
    "NativeGlobalComMixin",
    "NativeProcessorMixin",
    "expand_image_runs",
    "native_image_tokens",
    "position_columns",
    "shifted_positions",
]
