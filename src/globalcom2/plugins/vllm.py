"""vLLM out-of-tree models: LLaVA-NeXT, LLaVA-OneVision and InternVL with GlobalCom² in budget mode (paper Sec. 4).

Budget mode is what makes vLLM possible: the number of visual tokens depends on the image size and the budget
(``ratio`` R or ``max_image_tokens`` T) only, so the multimodal processor reserves exactly that many image positions
(KV cache, scheduling) before any forward, and the model hands back exactly that many embeddings. Per family, what
this module adds to vLLM's own model:

- **LLaVA-NeXT / LLaVA-OneVision** (:class:`GlobalComLlavaNextForConditionalGeneration`,
  :class:`GlobalComLlavaOnevisionForConditionalGeneration`, sharing :class:`AnyresGlobalComMixin`): the processing
  info's ``get_num_image_tokens`` returns the budget-mode count of the family's anyres geometry
  (:func:`image_geometry`: :func:`~globalcom2.adapters.anyres.anyres_geometry`, with OneVision's ``anyres_max``
  down-sampling; :meth:`~globalcom2.adapters.anyres.AnyresGeometry.num_budget_tokens`, i.e.
  :func:`~globalcom2.core.budget.budget_counts` plus one newline per crop-token row: the count the transformers
  adapters patch into HF's processors). The model computes tile features with vLLM's own tower and projector, scores
  them ([CLS] row of the tower's last layer, Eq. 1, or Eq. 7 for towers without [CLS] such as OneVision's SigLIP),
  packs each image with vLLM's own packing (unpadding, down-sampling, newlines) and keeps the rows
  :func:`~globalcom2.adapters.anyres.plan_anyres_batch` picks: allocation (Eq. 2-4), holistic scores (Eq. 5) and
  selection (Eq. 6) by :func:`~globalcom2.core.select.select_images`, one batched call for all images of a forward,
  the same call as the transformers adapters.
- **InternVL** (:class:`GlobalComInternVLForConditionalGeneration`, on vLLM's class for the HF-format
  ``InternVLForConditionalGeneration``): the processor reports ``<img>`` + the budget count
  (:func:`~globalcom2.adapters.internvl.internvl_num_image_tokens`) + ``</img>`` per image and hands each image's tile
  grid to the model (``globalcom2_tile_grids``: the grid cannot be recovered from the tile count); the model scores
  the patches with the [CLS] row of InternViT's last layer (Eq. 1, summed over each 2x2 pixel-shuffle group) and keeps
  the tokens :func:`~globalcom2.adapters.internvl.plan_internvl_batch` picks, in InternVL's order.

**Per-request options** (shared with the native-resolution families: :mod:`globalcom2.plugins.vllm_common`). A
request's ``mm_processor_kwargs`` may override the server's budget and selection rule (:data:`REQUEST_OPTIONS`;
:func:`request_options`, an HTTP 400 on a bad value). The processors count each image under
its request's options and hand them to the model as one per-image field (``globalcom2_options``,
:func:`options_row`); the models plan each image with its own options (:func:`plan_by_options`). vLLM hashes the
request's ``mm_processor_kwargs`` into every cache key of the image (processor cache, encoder cache, prefix-cache
blocks), so one image under two budgets never shares a cached result. Profiling runs uncompressed
(:data:`UNCOMPRESSED`), so the encoder cache fits any per-request budget.

**[CLS] scores without an attention map.** vLLM builds a CLIP tower only up to the feature layer
(``vision_feature_layer=-2``: all layers but the last), so the last layer's *input* is the tower's output;
:class:`ClsScorer` holds that layer's pre-attention LayerNorm and q/k/v projection (loaded from the checkpoint's
last-layer weights, which vLLM would drop) and computes the [CLS] query row against the patch keys. InternViT is built
whole; a forward pre-hook on its last layer (installed for the duration of one encode) reads the layer's input.

**Tensor parallelism.** The CLIP scorer's qkv projection is column-parallel like the tower's attention, so each rank
holds ``H / tp`` heads: each rank sums its heads' [CLS] rows, an all-reduce adds the sums, and dividing by the total
H gives the head mean of Eq. 1 on every rank (:func:`head_mean_across_ranks`; the same plan everywhere). vLLM 0.32's
InternViT keeps q/k/v unsplit (plain ``nn.Linear`` on every rank; only its MLP is split), so its scores are computed
in full on every rank and need no reduction. Untested on real ranks here (one CPU, no GPU): the tests emulate two
ranks in one process.

Switched on per model (see docs/engines.md)::

    vllm serve llava-hf/llava-v1.6-mistral-7b-hf --hf-overrides \\
      '{"architectures": ["GlobalCom2LlavaNextForConditionalGeneration"], "globalcom2": {"ratio": 0.25}}'

(``GlobalCom2LlavaOnevisionForConditionalGeneration`` / ``GlobalCom2InternVLForConditionalGeneration`` alike;
``{"max_image_tokens": 300}`` instead of a ratio), or for every model of every GlobalCom² family (these three and the
Qwen ones of :mod:`globalcom2.plugins.vllm_qwen`) that the process serves: ``GLOBALCOM2_VLLM='{"ratio": 0.25}' vllm
serve ...``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from torch import nn

from ..adapters.anyres import AnyresGeometry, anyres_geometry, plan_anyres_batch
from ..adapters.internvl import (
    GRID_KEY,
    internvl_num_image_tokens,
    merge_pool,
    num_tiles,
    plan_internvl_batch,
    tile_grids_for,
)
from ..adapters.llava_onevision import anyres_max_shape, parse_anyres_max
from ..config import GlobalComConfig
from ..core.plan import Plan
from ..core.scores import cls_attention_scores, cosine_scores
from ..extras import MissingDependencyError, install_command

try:
    from vllm.config import VllmConfig
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.models.clip import CLIPVisionModel
    from vllm.model_executor.models.interns1 import (
        InternS1DummyInputsBuilder,
        InternS1ForConditionalGeneration,
        InternS1ImagePixelInputs,
        InternS1MultiModalProcessor,
        InternS1ProcessingInfo,
    )
    from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
    from vllm.model_executor.models.llava_next import (
        LlavaNextForConditionalGeneration,
        LlavaNextMultiModalProcessor,
        LlavaNextProcessingInfo,
    )
    from vllm.model_executor.models.llava_onevision import (
        LlavaOnevisionDummyInputsBuilder,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionMultiModalProcessor,
        LlavaOnevisionProcessingInfo,
    )
    from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
    from vllm.model_executor.models.vision import is_vit_use_data_parallel
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig
    from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, ImageSize
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails, cached_encode
    from vllm.utils.tensor_schema import TensorShape
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.vllm needs vLLM (>=0.32,<0.34): {install_command('vllm')}", name="vllm"
    ) from exc

from . import VLLM_ARCHITECTURE as ARCHITECTURE
from . import VLLM_ARCHITECTURES as ARCHITECTURES
from . import VLLM_CONFIG_KEY as CONFIG_KEY
from . import VLLM_ENV_VAR as ENV_VAR
from . import register_vllm as register
from .vllm_common import (
    OPTIONS_KEY,
    REQUEST_OPTIONS,
    SERVER_OPTIONS,
    UNCOMPRESSED,
    ImageOptionsInputMixin,
    RequestOptionsInfoMixin,
    RequestOptionsProcessorMixin,
    head_mean_across_ranks,
    image_options,
    options_from_config,
    options_from_row,
    options_row,
    plan_by_options,
    request_options,
    without_request_options,
)


# -- counts (the processors and the models agree through these) ----------------------------------------------------
def image_geometry(
    hf_config: Any, tile_size: int, patches_per_side: int, height: int, width: int
) -> AnyresGeometry:
    """Anyres tiling of one ``height x width`` image (crop grid, valid box, crop token grid), as vLLM packs it.

    LLaVA-NeXT: the valid box itself. LLaVA-OneVision (a config with ``vision_aspect_ratio="anyres_max_N"``): the
    box down-sampled by OneVision's rule (:func:`~globalcom2.adapters.llava_onevision.anyres_max_shape`).
    """
    aspect = getattr(hf_config, "vision_aspect_ratio", None)
    token_grid = None
    if aspect is not None:
        max_tiles = parse_anyres_max(aspect)

        def token_grid(box: tuple[int, int, int, int], g: int) -> tuple[int, int]:
            return anyres_max_shape(box[1] - box[0], box[3] - box[2], g, max_tiles)

    return anyres_geometry(
        (height, width), hf_config.image_grid_pinpoints, tile_size, patches_per_side, token_grid
    )


def num_image_tokens(
    hf_config: Any, tile_size: int, patches_per_side: int, height: int, width: int,
    options: GlobalComConfig | None = None,
) -> int:  # fmt: skip
    """Image tokens one ``height x width`` image gets in budget mode (LLaVA-NeXT / OneVision), newlines included,
    under ``options`` (default: the server's, :func:`options_from_config`)."""
    geo = image_geometry(hf_config, tile_size, patches_per_side, height, width)
    return geo.num_budget_tokens(options_from_config(hf_config) if options is None else options)


def internvl_tokens_per_tile(hf_config: Any) -> int:
    """Merged tokens per InternVL tile: ``(image_size / patch_size * downsample_ratio)**2``."""
    vcfg = hf_config.vision_config
    size, patch = vcfg.image_size, vcfg.patch_size
    side = (int(size[0]) if isinstance(size, (list, tuple)) else int(size)) // (
        int(patch[0]) if isinstance(patch, (list, tuple)) else int(patch)
    )
    factor = round(1 / float(hf_config.downsample_ratio))
    return (side // factor) ** 2


def internvl_image_tokens(hf_config: Any, tiles: int, options: GlobalComConfig | None = None) -> int:
    """``<IMG_CONTEXT>`` tokens of one InternVL image of ``tiles`` tiles in budget mode (``<img>``/``</img>`` not
    included; the prompt holds ``2 + this``) under ``options`` (default: the server's)."""
    return internvl_num_image_tokens(
        options_from_config(hf_config) if options is None else options,
        tiles,
        internvl_tokens_per_tile(hf_config),
    )


# -- scoring -------------------------------------------------------------------------------------------------------
class ClsScorer(nn.Module):
    """A CLIP tower's last layer, as far as [CLS]-row scores need it (paper Eq. 1): pre-norm and q/k(/v).

    Loaded from the checkpoint's last-layer weights (``layer_norm1``, ``self_attn.{q,k,v}_proj``); the rest of that
    layer is never built. Tensor-parallel like the tower's own attention.
    """

    def __init__(self, vision_config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__()
        hidden = int(vision_config.hidden_size)
        self.num_heads = int(vision_config.num_attention_heads)
        use_data_parallel = is_vit_use_data_parallel()
        self.tp_size = 1 if use_data_parallel else get_tensor_model_parallel_world_size()
        if self.num_heads % self.tp_size:
            raise ValueError(f"{self.num_heads} vision heads cannot be split over {self.tp_size} ranks")
        self.num_local_heads = self.num_heads // self.tp_size
        self.layer_norm1 = nn.LayerNorm(hidden, eps=vision_config.layer_norm_eps)
        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden,
            head_size=hidden // self.num_heads,
            total_num_heads=self.num_heads,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            disable_tp=use_data_parallel,
        )

    def forward(self, hidden: torch.Tensor, kind: str = "logits") -> torch.Tensor:
        """Head-mean [CLS]-row scores.

        Args:
            hidden: ``(T, 1 + N, D)`` input of the last layer ([CLS] first).
            kind: ``"logits"`` or ``"softmax"`` (see :func:`globalcom2.core.scores.cls_attention_scores`).

        Returns:
            ``(T, N)`` float32, identical on every tensor-parallel rank.
        """
        qkv, _ = self.qkv_proj(self.layer_norm1(hidden))
        q, k, _ = qkv.chunk(3, dim=-1)  # this rank's heads
        # The fused projection already ran; hand its q/k to the shared scoring function (norm done above).
        local = cls_attention_scores(
            hidden, norm=lambda x: x, q_proj=lambda _x: q[:, :1], k_proj=lambda _x: k,
            num_heads=self.num_local_heads, kind=kind,
        )  # fmt: skip
        if self.tp_size == 1:
            return local
        return head_mean_across_ranks(
            local, self.num_local_heads, self.num_heads, tensor_model_parallel_all_reduce
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``layer_norm1.*`` and ``self_attn.{q,k,v}_proj.*`` of the last layer; skip the rest of it."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards = {"self_attn.q_proj.": "q", "self_attn.k_proj.": "k", "self_attn.v_proj.": "v"}
        for name, weight in weights:
            for src, shard in shards.items():
                if name.startswith(src):
                    target = "qkv_proj." + name[len(src) :]
                    if target in params:
                        params[target].weight_loader(params[target], weight, shard)  # type: ignore[attr-defined]
                        loaded.add(target)
                    break
            else:
                if name in params:  # layer_norm1.weight / .bias
                    loader = getattr(params[name], "weight_loader", default_weight_loader)
                    loader(params[name], weight)
                    loaded.add(name)
        return loaded


# -- LLaVA-NeXT and LLaVA-OneVision ----------------------------------------------------------------------------------
class GlobalComLlavaNextProcessingInfo(RequestOptionsInfoMixin, LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing info with the budget-mode placeholder count."""

    def get_num_image_tokens(
        self, *, image_width: int, image_height: int, options: GlobalComConfig | None = None
    ) -> int:
        encoder = self.get_vision_encoder_info()
        return num_image_tokens(
            self.get_hf_config(), encoder.get_image_size(), encoder.get_patch_grid_length(), image_height,
            image_width, self.globalcom_server_options if options is None else options,
        )  # fmt: skip

    def get_image_size_with_most_features(self) -> ImageSize:
        # The pinpoint with the most *uncompressed* tokens (any request may ask for R = 1); ties: the first.
        sizes = [ImageSize(width=w, height=h) for h, w in self.get_hf_config().image_grid_pinpoints]
        return max(sizes, key=lambda s: self.get_num_image_tokens(
            image_width=s.width, image_height=s.height, options=UNCOMPRESSED))  # fmt: skip


class GlobalComLlavaOnevisionProcessingInfo(RequestOptionsInfoMixin, LlavaOnevisionProcessingInfo):
    """vLLM's LLaVA-OneVision processing info with the budget-mode placeholder count (images; videos untouched)."""

    get_num_image_tokens = GlobalComLlavaNextProcessingInfo.get_num_image_tokens


class AnyresProcessorMixin(RequestOptionsProcessorMixin):
    """LLaVA-NeXT / OneVision processors: each image's placeholder run has the count of the request's options."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:  # fmt: skip
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        options = self.info.globalcom_options(hf_processor_mm_kwargs)
        token_id = int(self.info.get_hf_config().image_token_index)

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [token_id] * images.get_feature_size(item_idx)  # precomputed embeddings pass through
            size = images.get_image_size(item_idx)
            count = self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height, options=options
            )
            return [token_id] * count

        image = PromptReplacement(modality="image", target=[token_id], replacement=replacement)
        return [image if u.modality == "image" else u for u in updates]


class GlobalComLlavaNextMultiModalProcessor(AnyresProcessorMixin, LlavaNextMultiModalProcessor):
    """vLLM's LLaVA-NeXT processor with per-request GlobalCom² options."""


class GlobalComLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """vLLM's LLaVA-OneVision processor with per-request GlobalCom² options (videos untouched)."""


class AnyresGlobalComMixin(ImageOptionsInputMixin):
    """What the vLLM LLaVA-NeXT and LLaVA-OneVision models with GlobalCom² share: scoring, planning, selection.

    A family sets :attr:`globalcom_strategies` and implements :meth:`_globalcom_merge` (vLLM's own packing of one
    image). Options come from ``hf_config.globalcom2`` (``--hf-overrides``) or ``GLOBALCOM2_VLLM``
    (:func:`options_from_config`). ``importance="auto"`` uses [CLS] scores for CLIP towers and Eq. 7 (cosine to the
    tile mean, on the selected features) otherwise.
    """

    #: vision_feature_select_strategy the family needs, by whether the tower has a [CLS] token.
    globalcom_strategies: Mapping[bool, str] = {True: "default", False: "default"}
    config: Any
    vision_tower: Any
    multi_modal_projector: Any
    hf_to_vllm_mapper: Any

    def _globalcom_setup(self, vllm_config: VllmConfig, prefix: str) -> None:
        config = self.config
        self.globalcom_config = options_from_config(config)
        is_clip = isinstance(self.vision_tower, CLIPVisionModel)
        strategy = config.vision_feature_select_strategy
        if strategy != self.globalcom_strategies[is_clip]:
            raise ValueError(
                f"GlobalCom² needs vision_feature_select_strategy={self.globalcom_strategies[is_clip]!r} with a "
                f"{type(self.vision_tower).__name__} (one feature per patch), got {strategy!r}"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"GlobalCom² supports a single vision_feature_layer, got {config.vision_feature_layer!r}"
            )
        vcfg = config.vision_config
        self.globalcom_tile = int(vcfg.image_size)
        self.globalcom_grid = self.globalcom_tile // int(vcfg.patch_size)
        importance = self.globalcom_config.importance
        if importance == "auto":
            importance = "cls" if is_clip else "cosine"
        self.globalcom_importance = importance
        self.globalcom_scorer: ClsScorer | None = None
        self.globalcom_plans: list[Plan] = []  # plans of the last batch of images (inspection and tests)
        if importance != "cls":
            return
        if not is_clip:
            raise ValueError(
                f"importance='cls' needs a CLIP vision tower with [CLS]; got {type(self.vision_tower).__name__} "
                "(use importance='cosine' or 'auto')"
            )
        num_layers = int(vcfg.num_hidden_layers)
        built = len(self.vision_tower.vision_model.encoder.layers)
        if built != num_layers - 1:
            raise ValueError(
                f"GlobalCom² [CLS] scores need vision_feature_layer=-2 (the last layer's input is the features); "
                f"this model uses {config.vision_feature_layer!r} ({built} of {num_layers} layers built). "
                "Use importance='cosine'."
            )
        towers: list[str] = list(getattr(self, "_tower_model_names", []))
        with self._mark_tower_model(vllm_config, "image"):  # type: ignore[attr-defined]
            self.globalcom_scorer = ClsScorer(
                vcfg, vllm_config.quant_config, prefix=maybe_prefix(prefix, "globalcom_scorer")
            )
        added: list[str] = list(getattr(self, "_tower_model_names", []))
        self._tower_model_names = [*towers, *added]  # the context replaced the list: keep vLLM's tower too
        # The last layer's weights (dropped by vLLM's tower, which stops before it) feed the scorer.
        self.hf_to_vllm_mapper = type(self).hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_prefix={
                f"vision_tower.vision_model.encoder.layers.{num_layers - 1}.": "globalcom_scorer."
            }
        )

    def _globalcom_features(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, scores)`` of a stack of tiles: the projector's input and the per-patch importance."""
        if self.globalcom_scorer is not None:
            # Tower built up to layer L-1: its output, [CLS] included, is the last layer's input.
            hidden = self.vision_tower(stacked, select_layers=None, feature_select_strategy=None)
            return hidden[:, 1:], self.globalcom_scorer(hidden, kind=self.globalcom_config.score)
        features = self._image_pixels_to_features(self.vision_tower, stacked)  # type: ignore[attr-defined]
        return features, cosine_scores(features)  # Eq. 7

    def _process_image_input(self, image_input: Any) -> torch.Tensor | list[torch.Tensor]:
        if image_input.get("type") == "image_embeds":
            # Precomputed embeddings: nothing to score; counted by their own length.
            return image_input["data"]
        # A (B, tiles, C, H, W) tensor or a list of (tiles_i, C, H, W).
        per_image = list(image_input["pixel_values"])
        num_tiles_per_image = [int(p.shape[0]) for p in per_image]
        features, scores = self._globalcom_features(torch.cat(per_image))
        embeds = self.multi_modal_projector(features)
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            image_sizes = torch.tensor([[self.globalcom_tile, self.globalcom_tile]] * len(per_image))
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes  # one read
        geos, packed = [], []
        for tiles, (height, width) in zip(embeds.split(num_tiles_per_image), sizes, strict=True):
            height, width = int(height), int(width)
            geo = image_geometry(self.config, self.globalcom_tile, self.globalcom_grid, height, width)
            n = 1 + geo.grid[0] * geo.grid[1]
            if tiles.shape[0] < n:
                raise ValueError(f"image {height}x{width} needs {n} tiles, got {tiles.shape[0]}")
            geos.append(geo)
            packed.append(self._globalcom_merge(torch.tensor([height, width]), tiles[:n]))
        # One batched selection per distinct request options (the rows plan_anyres_batch picks from vLLM's packing).
        tile_scores = [
            s[: 1 + g.grid[0] * g.grid[1]]
            for s, g in zip(scores.split(num_tiles_per_image), geos, strict=True)
        ]
        configs = image_options(image_input.get(OPTIONS_KEY), len(geos), self.globalcom_config)
        planned = plan_by_options(
            configs,
            lambda idx, cfg: plan_anyres_batch([tile_scores[i] for i in idx], [geos[i] for i in idx], cfg),
        )
        out = []
        for seq, geo, config, (plan, index) in zip(packed, geos, configs, planned, strict=True):
            if seq.shape[0] != plan.num_tokens_full:
                raise RuntimeError(
                    f"GlobalCom²: vLLM packed {seq.shape[0]} embeddings for an image with a {geo.grid} grid and "
                    f"valid box {geo.box}, the geometry gives {plan.num_tokens_full}; this vLLM version packs "
                    "differently"
                )
            kept = seq[index.to(seq.device)]
            reserved = geo.num_budget_tokens(config)  # the processor's count (num_image_tokens)
            if kept.shape[0] != reserved:
                raise RuntimeError(f"GlobalCom²: kept {kept.shape[0]} embeddings for {reserved} positions")
            out.append(kept)
        self.globalcom_plans = [plan for plan, _ in planned]
        return out

    def _globalcom_merge(self, size: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """vLLM's own packed sequence of one image (thumbnail, then the crop token grid row by row + newlines).

        Args:
            size: ``(2,)`` original (height, width), on the host.
            tiles: ``(1 + n, N, H_llm)`` projected features of the image's tiles.
        """
        raise NotImplementedError


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComLlavaNextMultiModalProcessor,
    info=GlobalComLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class GlobalComLlavaNextForConditionalGeneration(AnyresGlobalComMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with GlobalCom² (budget mode): the image embeddings of each image are its kept tokens."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._globalcom_setup(vllm_config, prefix)

    def _globalcom_merge(self, size: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(size, tiles, strategy="spatial_unpad")


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComLlavaOnevisionMultiModalProcessor,
    info=GlobalComLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class GlobalComLlavaOnevisionForConditionalGeneration(
    AnyresGlobalComMixin, LlavaOnevisionForConditionalGeneration
):
    """vLLM's LLaVA-OneVision with GlobalCom² (budget mode) for images; videos pass through unchanged.

    SigLIP towers (no [CLS], strategy ``"full"``) score by Eq. 7, CLIP towers (strategy ``"default"``) by [CLS].
    Several images per prompt work: vLLM hands OneVision's processor a flat list of images, so each one is
    anyres-tiled (unlike HF's batched multi-image mode) and planned on its own.
    """

    globalcom_strategies = {True: "default", False: "full"}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        parse_anyres_max(self.config.vision_aspect_ratio)  # fail early on an unknown aspect rule
        self._globalcom_setup(vllm_config, prefix)

    def _globalcom_merge(self, size: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        # The config's anyres_max_N (vLLM's default argument is 9; the geometry reads the config).
        return self._merge_image_patch_embeddings(
            size, tiles, image_newline=self.image_newline, vision_aspect_ratio=self.config.vision_aspect_ratio,
            strategy="spatial_unpad",
        )  # fmt: skip


# -- InternVL ------------------------------------------------------------------------------------------------------
class GlobalComInternVLProcessingInfo(RequestOptionsInfoMixin, InternS1ProcessingInfo):
    """vLLM's InternVL (HF format) processing info with the budget-mode ``<IMG_CONTEXT>`` count."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any,
                             mm_kwargs: Mapping[str, object]) -> int:  # fmt: skip
        tiles = processor.image_processor.get_number_of_image_patches(
            image_height, image_width, self.ctx.get_merged_mm_kwargs(without_request_options(mm_kwargs))
        )
        return internvl_image_tokens(self.get_hf_config(), int(tiles), self.globalcom_options(mm_kwargs))

    def get_image_size_with_most_features(self) -> ImageSize:
        # The tiling with the most *uncompressed* tokens (any request may ask for R = 1); ties: the first.
        height, width = self.get_hf_config().vision_config.image_size
        processor = self.get_hf_processor()
        sizes = [ImageSize(width=width * w, height=height * h) for w, h in self.resolve_target_ratios()]
        return max(sizes, key=lambda s: self.get_num_image_tokens(
            image_width=s.width, image_height=s.height, processor=processor, mm_kwargs={"ratio": 1.0}))  # fmt: skip


class GlobalComInternVLMultiModalProcessor(RequestOptionsProcessorMixin, InternS1MultiModalProcessor):
    """vLLM's InternVL processor, plus each image's tile grid for the model and the budget-mode prompt count."""

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if "image_num_patches" in processed:
            images = mm_items.get_items("image", ImageProcessorItems)
            processed[GRID_KEY] = torch.tensor(
                self._tile_grids(images, processed["image_num_patches"].tolist(), hf_kwargs), dtype=torch.long
            )
        return processed

    def _tile_grids(self, images: Any, counts: list[int], hf_kwargs: Mapping[str, object]) -> list[list[int]]:
        """(rows, cols) of every image by HF's tiling rule, checked against the tile counts HF produced."""
        ip = self.info.get_hf_processor(**hf_kwargs).image_processor
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)

        def opt(name: str) -> Any:
            value = merged.get(name)
            return getattr(ip, name) if value is None else value

        sizes = []
        for i in range(len(counts)):
            image_size = images.get_image_size(i)
            sizes.append((int(image_size.height), int(image_size.width)))
        return tile_grids_for(sizes, counts, opt)

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[GRID_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:  # fmt: skip
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()
        start = cached_encode(tokenizer, hf_processor.start_image_token, add_special_tokens=False)
        end = cached_encode(tokenizer, hf_processor.end_image_token, add_special_tokens=False)
        context_id = int(hf_processor.image_token_id)
        data = out_mm_kwargs.get_data()
        tiles = data["image_num_patches"].tolist() if "image_num_patches" in data else []
        hf_config = self.info.get_hf_config()
        options = self.info.globalcom_options(hf_processor_mm_kwargs)

        def replacement(item_idx: int) -> Any:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                count = images.get_feature_size(item_idx)  # precomputed embeddings pass through
            else:
                count = internvl_image_tokens(hf_config, int(tiles[item_idx]), options)
            ids = [*start, *([context_id] * count), *end]
            return PromptUpdateDetails.select_token_id(ids, context_id)

        image = PromptReplacement(modality="image", target=[context_id], replacement=replacement)
        return [image if u.modality == "image" else u for u in updates]


class GlobalComInternVLImagePixelInputs(InternS1ImagePixelInputs):
    """vLLM's InternVL image input plus each image's tile grid (rows, cols).

    Dimensions: bn = number of images.
    """

    tile_grids: Annotated[torch.Tensor, TensorShape("bn", 2)]
    globalcom2_options: Annotated[torch.Tensor | None, TensorShape("bn", len(REQUEST_OPTIONS))]


@MULTIMODAL_REGISTRY.register_processor(
    GlobalComInternVLMultiModalProcessor,
    info=GlobalComInternVLProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class GlobalComInternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    """vLLM's InternVL (HF format) with GlobalCom² (budget mode): each image's embeddings are its kept tokens.

    Scores: the [CLS] row of InternViT's last layer (Eq. 1, ``importance="auto"``/``"cls"``) summed over each
    pixel-shuffle group (:func:`~globalcom2.adapters.internvl.merge_pool`), or Eq. 7 on the merged tokens
    (``"cosine"``). Videos pass through unchanged.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom_config = options_from_config(config)
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "GlobalCom² needs vision_feature_select_strategy='default' ([CLS] dropped) on InternVL, got "
                f"{config.vision_feature_select_strategy!r}"
            )
        importance = self.globalcom_config.importance
        self.globalcom_importance = "cls" if importance == "auto" else importance
        self.globalcom_factor = round(1 / float(config.downsample_ratio))
        self.globalcom_g = math.isqrt(internvl_tokens_per_tile(config))
        self.globalcom_plans: list[Plan] = []

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        image_input = super()._parse_and_validate_image_input(**kwargs)
        grids: Any = kwargs.get(GRID_KEY)
        if image_input is None or image_input["type"] != "pixel_values" or grids is None:
            return image_input
        if isinstance(grids, list):
            grids = torch.stack([torch.as_tensor(g) for g in grids])
        options: Any = kwargs.get(OPTIONS_KEY)
        if isinstance(options, list):
            options = torch.stack([torch.as_tensor(o) for o in options])
        h, w = self.config.vision_config.image_size
        return GlobalComInternVLImagePixelInputs(
            type="pixel_values", pixel_values=image_input["pixel_values"], num_patches=image_input["num_patches"],
            tile_grids=grids.reshape(-1, 2), globalcom2_options=options, resolve_bindings={"h": h, "w": w},
        )  # fmt: skip

    @contextmanager
    def _globalcom_recording(self, out: list[torch.Tensor]) -> Iterator[None]:
        """During one encode, append the per-token scores to ``out``: the [CLS] row (Eq. 1) of InternViT's last
        layer's input, summed over each pixel-shuffle group, or Eq. 7 on the projector's input (merged tokens)."""
        if self.globalcom_importance == "cosine":
            module: nn.Module = self.multi_modal_projector

            def hook(_module: nn.Module, args: tuple) -> None:
                out.append(cosine_scores(args[0]))

        else:
            module = layer = self.vision_tower.encoder.layer[-1]
            att = layer.attention
            q_norm, k_norm = (
                (att.q_norm, att.k_norm) if att.qk_normalization else (nn.Identity(), nn.Identity())
            )
            kind, factor = self.globalcom_config.score, self.globalcom_factor

            def hook(_module: nn.Module, args: tuple) -> None:
                scores = cls_attention_scores(
                    args[0], norm=layer.layernorm_before, q_proj=lambda x: q_norm(att.q_proj(x)),
                    k_proj=lambda x: k_norm(att.k_proj(x)), num_heads=att.num_heads, kind=kind,
                )  # fmt: skip
                out.append(merge_pool(scores, factor))

        handle = module.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _process_vision_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        if not isinstance(image_input, GlobalComInternVLImagePixelInputs):
            return super()._process_vision_input(image_input)  # videos, embeddings, inputs without grids
        recorded: list[torch.Tensor] = []
        with self._globalcom_recording(recorded):
            embeds = self.extract_feature(image_input["pixel_values"])  # (tiles, g*g, H_llm)
        scores = torch.cat(recorded)
        grids = [(int(r), int(c)) for r, c in image_input["tile_grids"].tolist()]
        counts = [int(n) for n in image_input["num_patches"].tolist()]
        for grid, count in zip(grids, counts, strict=True):
            if num_tiles(*grid) != count:
                raise RuntimeError(f"GlobalCom²: tile grid {grid} does not match {count} tiles")
        # One batched selection per distinct request options.
        tile_scores = list(scores.split(counts))
        configs = image_options(image_input["globalcom2_options"], len(grids), self.globalcom_config)
        planned = plan_by_options(configs, lambda idx, cfg: plan_internvl_batch(
            [tile_scores[i] for i in idx], [grids[i] for i in idx], self.globalcom_g, cfg))  # fmt: skip
        out = [
            tiles.reshape(-1, embeds.shape[-1])[index.to(embeds.device)]
            for tiles, (_, index) in zip(embeds.split(counts), planned, strict=True)
        ]
        self.globalcom_plans = [plan for plan, _ in planned]
        return tuple(out)


__all__ = [
    "ARCHITECTURE",
    "ARCHITECTURES",
    "CONFIG_KEY",
    "ENV_VAR",
    "AnyresGlobalComMixin",
    "ClsScorer",
    "GlobalComInternVLForConditionalGeneration",
    "GlobalComInternVLMultiModalProcessor",
    "GlobalComInternVLProcessingInfo",
    "GlobalComLlavaNextMultiModalProcessor",
    "GlobalComLlavaOnevisionMultiModalProcessor",
    "GlobalComLlavaNextForConditionalGeneration",
    "GlobalComLlavaNextProcessingInfo",
    "GlobalComLlavaOnevisionForConditionalGeneration",
    "GlobalComLlavaOnevisionProcessingInfo",
    "head_mean_across_ranks",
    "image_geometry",
    "internvl_image_tokens",
    "internvl_tokens_per_tile",
    "num_image_tokens",
    "OPTIONS_KEY",
    "REQUEST_OPTIONS",
    "SERVER_OPTIONS",
    "UNCOMPRESSED",
    "options_from_config",
    "options_from_row",
    "options_row",
    "plan_by_options",
    "request_options",
    "register",
    "without_request_options",
]
