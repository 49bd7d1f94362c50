"""What every GlobalCom² model in vLLM shares: server options, per-request options and their hand-over (paper Sec. 4).

The family modules (:mod:`globalcom2.plugins.vllm` for the tiled families, :mod:`globalcom2.plugins.vllm_qwen` for
the native-resolution ones) build on these pieces:

- :func:`options_from_config`: the server's options (``--hf-overrides '{"globalcom2": {...}}'`` or ``GLOBALCOM2_VLLM``),
  budget mode only;
- :func:`request_options`: a request's ``mm_processor_kwargs`` over the server's (:data:`REQUEST_OPTIONS`; an HTTP 400
  on a bad value or a server-only option, :data:`SERVER_OPTIONS`);
- :func:`options_row` / :func:`image_options`: each image's options handed from the processor to the model as one
  per-image field (:data:`OPTIONS_KEY`), and :func:`plan_by_options`: one batched selection (Eq. 2-6) per distinct
  set of options;
- :class:`RequestOptionsInfoMixin` / :class:`RequestOptionsProcessorMixin`: the processing side of the above, with
  profiling at the uncompressed count (:data:`UNCOMPRESSED`) so that every per-request budget fits the encoder cache.

vLLM hashes a request's ``mm_processor_kwargs`` into every cache key of its images (processor cache, encoder cache,
prefix-cache blocks), so one image under two budgets never shares a cached result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any, TypeVar

import torch

from ..config import GlobalComConfig
from ..core.allocation import ALLOCATIONS
from ..core.select import SCORINGS
from ..extras import MissingDependencyError, install_command

try:
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.inputs import MultiModalFieldConfig
    from vllm.multimodal.parse import ImageProcessorItems
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.vllm_common needs vLLM (>=0.32,<0.34): {install_command('vllm')}", name="vllm"
    ) from exc

from . import VLLM_CONFIG_KEY as CONFIG_KEY
from . import VLLM_ENV_VAR as ENV_VAR


def options_from_config(hf_config: Any) -> GlobalComConfig:
    """The GlobalCom² options of a model: ``hf_config.globalcom2`` if set, else the ``GLOBALCOM2_VLLM`` JSON.

    Either budget works: ``{"ratio": R}`` or ``{"max_image_tokens": T}`` (exactly one of them).

    Raises:
        ValueError / TypeError: invalid options, or ``mode="reference"`` (its counts depend on the scores, which
            vLLM's processor cannot know before the forward).
    """
    raw: Any = getattr(hf_config, CONFIG_KEY, None) if hf_config is not None else None
    source = f"hf_config.{CONFIG_KEY}"
    if raw is None:
        raw, source = os.environ.get(ENV_VAR) or "{}", ENV_VAR
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} must be a JSON object of GlobalCom² options, got {raw!r}") from exc
    if not isinstance(raw, Mapping):
        raise TypeError(f"{source} must be a mapping of GlobalCom² options, got {type(raw).__name__} {raw!r}")
    config = GlobalComConfig.from_kwargs(**dict(raw))
    if config.mode != "budget":
        raise ValueError(
            f"vLLM needs mode='budget' (got {config.mode!r}): reference-mode token counts depend on the scores, "
            "but vLLM reserves the image positions before the forward"
        )
    return config


# -- per-request options (mm_processor_kwargs) ---------------------------------------------------------------------
#: Options a request may set in ``mm_processor_kwargs``: the budget and the selection rule (paper Eq. 2-6).
REQUEST_OPTIONS = ("ratio", "max_image_tokens", "allocation", "scoring", "alpha", "tau")
#: Options fixed per server: they decide how the tower is read, once for every image of a forward (and, for the
#: native-resolution families, the region size G).
SERVER_OPTIONS = ("mode", "score", "importance", "region_tokens")
#: Per-image options handed from the processor to the model (one float64 row per image, see :func:`options_row`).
OPTIONS_KEY = "globalcom2_options"


def request_options(server: GlobalComConfig, mm_kwargs: Mapping[str, object]) -> GlobalComConfig:
    """The options of one request: the server's, overridden by the GlobalCom² keys of its ``mm_processor_kwargs``.

    A budget given in the request replaces the server's budget of the other kind (``ratio`` replaces
    ``max_image_tokens`` and vice versa); ``None`` means "not given". Other keys (HF processor options) are left to
    vLLM.

    Raises:
        VLLMValidationError: a bad value, both budgets, or a server-only option; vLLM answers it with HTTP 400 and
            this one-line message.
    """
    fixed = [key for key in SERVER_OPTIONS if key in mm_kwargs]
    if fixed:
        raise VLLMValidationError(
            f"mm_processor_kwargs: GlobalCom² option `{fixed[0]}` is set per server, not per request (per-request "
            f"options: {', '.join(REQUEST_OPTIONS)})",
            parameter=f"mm_processor_kwargs.{fixed[0]}",
        )
    given = {key: mm_kwargs[key] for key in REQUEST_OPTIONS if key in mm_kwargs}
    if not given:
        return server
    try:
        return GlobalComConfig.from_kwargs(server, **given)
    except (TypeError, ValueError) as exc:
        raise VLLMValidationError(f"mm_processor_kwargs: {exc}", parameter="mm_processor_kwargs") from None


def without_request_options(mm_kwargs: Mapping[str, object]) -> dict[str, object]:
    """``mm_kwargs`` less the GlobalCom² keys: what the HF processor may see (it knows none of them)."""
    ours = (*REQUEST_OPTIONS, *SERVER_OPTIONS)
    return {key: value for key, value in mm_kwargs.items() if key not in ours}


def options_row(config: GlobalComConfig) -> list[float]:
    """One image's per-request options as floats (NaN: budget not used): ratio, max_image_tokens, allocation index,
    scoring index, alpha, tau. float64 holds every Python float and int below 2**53 exactly."""
    return [
        math.nan if config.ratio is None else config.ratio,
        math.nan if config.max_image_tokens is None else float(config.max_image_tokens),
        float(ALLOCATIONS.index(config.allocation)),
        float(SCORINGS.index(config.scoring)),
        config.alpha,
        config.tau,
    ]


def options_from_row(row: Sequence[float], server: GlobalComConfig) -> GlobalComConfig:
    """Inverse of :func:`options_row` on top of the server's ``mode`` / ``score`` / ``importance``."""
    ratio, tokens, allocation, scoring, alpha, tau = (float(v) for v in row)
    return dataclasses.replace(
        server, ratio=None if math.isnan(ratio) else ratio,
        max_image_tokens=None if math.isnan(tokens) else int(tokens), allocation=ALLOCATIONS[int(allocation)],
        scoring=SCORINGS[int(scoring)], alpha=alpha, tau=tau,
    )  # fmt: skip


def image_options(rows: Any, num_images: int, server: GlobalComConfig) -> list[GlobalComConfig]:
    """Each image's options from the processor's ``globalcom2_options`` field ((n, 6) tensor or list of (6,) rows;
    None: the server's options for all), read from the host once."""
    if rows is None:
        return [server] * num_images
    if isinstance(rows, (list, tuple)):
        rows = torch.stack([torch.as_tensor(r) for r in rows])
    values = rows.reshape(-1, len(REQUEST_OPTIONS)).tolist()
    if len(values) != num_images:
        raise RuntimeError(f"GlobalCom²: {len(values)} option rows for {num_images} images")
    return [options_from_row(v, server) for v in values]


_T = TypeVar("_T")


def plan_by_options(
    configs: Sequence[GlobalComConfig], plan: Callable[[list[int], GlobalComConfig], list[_T]]
) -> list[_T]:
    """Plan a batch whose images may carry different options: one batched ``plan(indices, config)`` call per
    distinct config (in order of first appearance), results back in image order. Each image's plan is what it gets
    alone (the batched selection pads, it never mixes images), so the grouping changes no result."""
    groups: dict[GlobalComConfig, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(config, []).append(i)
    out: list[Any] = [None] * len(configs)
    for config, indices in groups.items():
        for i, result in zip(indices, plan(indices, config), strict=True):
            out[i] = result
    return out


def head_mean_across_ranks(
    local: torch.Tensor,
    num_local_heads: int,
    num_heads: int,
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Head mean of Eq. 1 over all ranks from each rank's mean over its own ``num_local_heads`` heads.

    Mean over all H heads = (sum over ranks of each rank's head sum) / H; the all-reduce adds the sums, so every
    rank ends with the same scores (and the same plan).
    """
    return all_reduce(local * num_local_heads) / num_heads


# -- processing (API server side): per-request options, counts, profiling ------------------------------------------
#: Options of the profiling run: the uncompressed count, so that every per-request budget fits the encoder cache.
UNCOMPRESSED = GlobalComConfig(ratio=1.0)


class RequestOptionsInfoMixin:
    """Processing-info side of per-request options: the server's options and those of one request."""

    get_hf_config: Callable[[], Any]

    @cached_property
    def globalcom_server_options(self) -> GlobalComConfig:
        return options_from_config(self.get_hf_config())

    def globalcom_options(self, mm_kwargs: Mapping[str, object]) -> GlobalComConfig:
        """A request's options (its ``mm_processor_kwargs`` over the server's); raises the HTTP 400 error."""
        return request_options(self.globalcom_server_options, mm_kwargs)

    def get_hf_processor(self, **kwargs: object) -> Any:
        # Our keys are no HF processor options (vLLM would build a new processor per value).
        return super().get_hf_processor(**without_request_options(kwargs))  # type: ignore[misc]


class RequestOptionsProcessorMixin:
    """Multimodal-processor side: validate a request's options first, keep them from the HF processor, hand each
    image's options to the model (``globalcom2_options``), profile at the uncompressed count.

    The options stay in the request's ``mm_processor_kwargs``, which vLLM hashes into each item's cache key
    (processor cache, encoder cache, prefix-cache blocks): the same image under two budgets is two cache entries.
    """

    info: Any

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        # A bad value is an HTTP 400 before any work.
        self.info.globalcom_options(inputs.hf_processor_mm_kwargs)
        return super().apply(inputs, timing_ctx)  # type: ignore[misc]

    def get_dummy_inputs(self, *args: Any, **kwargs: Any) -> Any:
        inputs = super().get_dummy_inputs(*args, **kwargs)  # type: ignore[misc]
        inputs.hf_processor_mm_kwargs = {**inputs.hf_processor_mm_kwargs, "ratio": UNCOMPRESSED.ratio}
        return inputs

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        return super()._call_hf_processor(hf_data, without_request_options(hf_kwargs))  # type: ignore[misc]

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        # The HF processor never sees our keys (some vLLM processors call it without _call_hf_processor).
        processed = super()._apply_hf_processor_main(  # type: ignore[misc]
            mm_items, without_request_options(hf_kwargs)
        )
        images = mm_items.get("image")
        if isinstance(images, ImageProcessorItems) and images.get_count():
            row = options_row(self.info.globalcom_options(hf_kwargs))
            processed[OPTIONS_KEY] = torch.tensor([row] * images.get_count(), dtype=torch.float64)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        fields[OPTIONS_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


class ImageOptionsInputMixin:
    """Model side: a pixel-image input keeps its images' per-request options (the processor's
    :data:`OPTIONS_KEY` rows) as an attribute, for :func:`image_options` when the images are planned."""

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        image_input = super()._parse_and_validate_image_input(**kwargs)  # type: ignore[misc]
        if image_input is not None and image_input.get("type") == "pixel_values":
            setattr(image_input, OPTIONS_KEY, kwargs.get(OPTIONS_KEY))
        return image_input


__all__ = [
    "OPTIONS_KEY",
    "REQUEST_OPTIONS",
    "SERVER_OPTIONS",
    "UNCOMPRESSED",
    "ImageOptionsInputMixin",
    "RequestOptionsInfoMixin",
    "RequestOptionsProcessorMixin",
    "head_mean_across_ranks",
    "image_options",
    "options_from_config",
    "options_from_row",
    "options_row",
    "plan_by_options",
    "request_options",
    "without_request_options",
]
