"""`FamilyAdapter`: everything a model family shares (checks, scoring hooks, placeholder checks, reference mode).

A family adapter is the diff from this base (as transformers' modular files are): it names its classes and
overrides a handful of hooks -- its tower description, its processor checks and counts, and how a tiled image's
scores become one :func:`~globalcom2.core.select.select_images` call per forward and a token order.

What the base patches (on instances only; all recorded on the handle and undone by ``remove()``):

- the [CLS]-row scores of paper Eq. 1 (any attention implementation; no ``output_attentions``): where the features
  come from the tower's **last** layer, forward hooks on that layer's own q/k projections take the [CLS] query and
  the keys it computes anyway (one small matmul per tile); where they come from an earlier layer (LLaVA-NeXT's -2),
  the last layer's ``forward`` is wrapped on the instance so that it hands its input on without running, and a
  pre-hook scores that input. For ``importance="cosine"`` a pre-hook on the projector computes Eq. 7 on its input.
  All of it acts only while the patched ``get_image_features`` runs, in the calling thread's
  :class:`~globalcom2.adapters.base.ForwardState`: a direct call of the tower, from any thread, is untouched;
- ``get_image_features`` (opens that capture scope; families may post-process its output);
- ``get_placeholder_mask``: first checks, image by image, that the prompts hold exactly the placeholders the plans
  need, and says how to fix it when they do not;
- ``forward``/``generate`` in reference mode (and for families that pass extra inputs): the official per-crop counts
  depend on the scores, so the processor cannot know them; the call encodes the images first and resizes each
  image's placeholder run to its plan's count.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from ..config import GlobalComConfig
from ..core.scores import cls_attention_scores, cls_scores_from_qk, cosine_scores
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError, UnsupportedModelError
from .placeholders import check_placeholders, pad_token_id, placeholder_positions, shrink_placeholders
from .towers import TowerInfo, describe_tower


class FamilyAdapter:
    """Shared base of the family adapters; instantiated by :func:`globalcom2.apply`.

    Class attributes a family sets: ``family`` (registry name), ``model_class_name``, ``processor_class_name``,
    ``wraps_calls`` (patch ``forward``/``generate`` in budget mode too, for :meth:`call_context`),
    ``encodes_first`` (budget mode also encodes before the call and resizes placeholder runs, as reference mode
    does: for layouts whose per-crop runs depend on the scores), ``vision_tower_name`` (the inner model's
    attribute holding the vision tower).
    """

    family: ClassVar[str]
    model_class_name: ClassVar[str]
    processor_class_name: ClassVar[str]
    wraps_calls: ClassVar[bool] = False
    encodes_first: ClassVar[bool] = False
    vision_tower_name: ClassVar[str] = "vision_tower"
    #: the attribute of the ``*ForConditionalGeneration`` holding the vision tower, projector and LLM (None: the
    #: model itself, as in Llama 4)
    inner_name: ClassVar[str | None] = "model"
    #: the family computes a per-image R (:meth:`ratio_for_image`), so ``max_image_tokens`` works.
    supports_max_image_tokens: ClassVar[bool] = False
    _skips_last_layer: bool = False  # install_scoring made the last layer skippable

    def __init__(self, model: Any, processor: Any, config: GlobalComConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.inner = getattr(model, self.inner_name) if self.inner_name else model
        self.tower: TowerInfo = self.describe_tower(getattr(self.inner, self.vision_tower_name))
        self.importance = self._resolve_importance()

    def __deepcopy__(self, memo: dict) -> FamilyAdapter:
        return self  # live patch machinery bound to one model (see GlobalComHandle.__deepcopy__)

    # -- identity ----------------------------------------------------------------------------------------------
    @classmethod
    def _transformers_class(cls, name: str) -> Any:
        import transformers

        return getattr(transformers, name, None)  # None: a class this transformers version lacks

    @classmethod
    def is_supported(cls, model: Any) -> bool:
        # Exact class: subclasses of one family's model pack features differently (e.g. OneVision and NeXT).
        return type(model).__name__ == cls.model_class_name and type(model) is cls._transformers_class(
            cls.model_class_name
        )

    def describe_tower(self, tower: Any) -> TowerInfo:
        """The scoring pieces of this family's vision tower (override for family-specific towers)."""
        return describe_tower(tower)

    def _resolve_importance(self) -> str:
        imp = self.config.importance
        if imp == "auto":
            return "cls" if self.tower.has_cls else "cosine"
        if imp == "cls" and not self.tower.has_cls:
            raise ValueError(
                f"`importance='cls'` needs a vision tower with a [CLS] token; {self.tower.name} has none "
                "(use importance='cosine' or 'auto')"
            )
        return imp

    # -- checks (run before anything is patched) ---------------------------------------------------------------
    def check(self) -> None:
        """Every check, before anything is patched: the model's, then the processor's."""
        if self.config.max_image_tokens is not None and not self.supports_max_image_tokens:
            raise UnsupportedModelError(
                f"max_image_tokens is not supported for {self.model_class_name} yet; pass ratio=..."
            )
        self.check_model()
        if self.processor is None:
            if self.config.mode == "budget" or self.needs_processor():
                raise ValueError(
                    f"{self.model_class_name} in mode={self.config.mode!r} needs the processor: "
                    f"{self.processor_needed_because()}; pass it as apply(model, processor, ...)"
                )
            return
        processor_class = self._transformers_class(self.processor_class_name)
        if not isinstance(self.processor, processor_class):
            raise UnsupportedModelError(
                f"processor must be a {self.processor_class_name} for {type(self.model).__name__}, "
                f"got {type(self.processor).__name__}"
            )
        token_id = self.processor_image_token_id()
        if token_id is not None and int(token_id) != int(self.model.config.image_token_id):
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image_token_id {token_id} vs {self.model.config.image_token_id}"
            )
        self.check_processor()

    def processor_image_token_id(self) -> int | None:
        """The id of the placeholder the processor writes into each image run (checked against the model's)."""
        return getattr(self.processor, "image_token_id", None)

    def check_model(self) -> None:
        """Family checks of the model (vision feature strategy, geometry)."""

    def check_processor(self) -> None:
        """Family checks of the processor against the model (tile size, pinpoints, ...)."""

    def needs_processor(self) -> bool:
        """Whether reference mode needs the processor too (budget mode always does)."""
        return False

    def processor_needed_because(self) -> str:
        return "budget mode emits the compressed placeholder count from the processor"

    # -- installation ------------------------------------------------------------------------------------------
    def install(self, handle: GlobalComHandle) -> None:
        self.install_scoring(handle)
        inner = self.inner
        handle.patch(inner, "get_image_features", self._encoding(handle, inner.get_image_features))
        self.install_placeholder_check(handle)
        self.install_family(handle)
        if self.config.mode == "budget" and self.processor is not None:
            self.install_budget_counts(handle)
        if self.config.mode == "reference" or self.wraps_calls or self.encodes_first:
            for name in ("forward", "generate"):
                handle.patch(self.model, name, self._model_call(handle, getattr(self.model, name), name))

    def install_scoring(self, handle: GlobalComHandle) -> None:
        """The scoring hooks: [CLS] row of the last layer (Eq. 1) or Eq. 7 on the projector's input.

        [CLS] scores where the last layer runs (features from it): forward hooks on the layer's own q/k projections
        take q of [CLS] and the keys as the layer computes them, and one small matmul per tile scores them
        (:meth:`_tap_hook`). Where the last layer's output is unused (features from an earlier layer), that layer is
        skipped for the call (:meth:`_skippable`) and a pre-hook scores its input (:meth:`_cls_hook`). Everything
        records only inside the patched ``get_image_features``, in the calling thread's state.
        """
        t = self.tower
        if self.importance == "cls":
            handle.add_hook(
                t.last_layer.register_forward_pre_hook(
                    functools.partial(self._cls_hook, handle), with_kwargs=True
                )
            )
            if t.q_out is not None and t.k_out is not None:
                for module in dict.fromkeys((t.q_out.module, t.k_out.module)):  # a fused qkv: one hook
                    handle.add_hook(module.register_forward_hook(functools.partial(self._tap_hook, handle)))
        else:
            handle.add_hook(
                self.inner.multi_modal_projector.register_forward_pre_hook(
                    functools.partial(self._cosine_hook, handle)
                )
            )
        if t.last_layer is not None:
            handle.patch(t.last_layer, "forward", self._skippable(handle, t.last_layer.forward))
            self._skips_last_layer = True

    def install_placeholder_check(self, handle: GlobalComHandle) -> None:
        """Check every image's placeholders before HF scatters the features (wraps ``get_placeholder_mask``)."""
        inner = self.inner
        handle.patch(
            inner, "get_placeholder_mask", self._placeholder_mask(handle, inner.get_placeholder_mask)
        )

    def install_family(self, handle: GlobalComHandle) -> None:
        """Family patches beyond the shared ones (e.g. the feature packing)."""

    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        """Patch the processor so that it emits the budget-mode placeholder count."""
        raise NotImplementedError

    def patch_placeholder_counts(self, handle: GlobalComHandle) -> None:
        """For processors that expand each image's placeholder in ``replace_image_token``: patch it and
        ``_get_num_multimodal_tokens`` (the serving-side count) with the adapter's ``_replace_image_token`` and
        ``_num_multimodal_tokens(original, ...)``."""
        proc: Any = self.processor
        handle.patch(proc, "replace_image_token", self._replace_image_token)  # type: ignore[attr-defined]
        handle.patch(
            proc,
            "_get_num_multimodal_tokens",
            functools.partial(self._num_multimodal_tokens, proc._get_num_multimodal_tokens),  # type: ignore[attr-defined]
        )

    #: what ``Plan.num_tokens`` counts, in the order the LLM reads it (for tables and messages)
    token_layout: ClassVar[str] = "image placeholders"
    #: processor options of the plans drawn and compared by ``visualize``, ``eval`` and the workflows (vision-side
    #: :meth:`plan_for_image` and the LLM-side methods' prefill alike; Gemma 3: pan-and-scan on, so it has crops)
    plan_processor_kwargs: ClassVar[dict[str, Any]] = {}
    #: what an image's prompt span holds besides its placeholders and counts towards ``max_image_tokens``
    #: (for messages; LLaVA-NeXT's newlines are placeholders, so they are in ``Plan.num_tokens`` already).
    layout_label: ClassVar[str] = "newlines included"

    def layout_tokens(self, grid: tuple[int, int]) -> int:
        """Prompt tokens of one image of this crop grid besides its placeholder runs that count towards
        ``max_image_tokens`` (markers such as InternVL's ``<img>``/``</img>``); none by default."""
        return 0

    def budgeted_tokens(self, plan: Any) -> int:
        """The count ``max_image_tokens`` bounds for one planned image: its placeholders (``Plan.num_tokens``)
        plus :meth:`layout_tokens`; the same count, uncompressed, for ``plan.num_tokens_full``."""
        return int(plan.num_tokens) + self.layout_tokens((int(plan.grid[0]), int(plan.grid[1])))

    def ratio_for_image(self, height: int, width: int) -> float:
        """R of one ``height x width`` image in budget mode: ``config.ratio``, or under ``max_image_tokens`` the
        largest R whose count (layout tokens included) fits (:meth:`globalcom2.GlobalComConfig.image_ratio`); the
        processor's count and the selection of that image both use it."""
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------------------------------------------
    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-patch scores ``(T, P)`` -> per-token scores of what the LLM receives (identity by default)."""
        return scores

    @torch.no_grad()
    def _cls_hook(self, handle: GlobalComHandle, module: Any, args: tuple, kwargs: dict) -> None:
        """Eq. 1 from the last layer's input (norm + projections here): when the layer is skipped or not tapped."""
        state = handle.state
        t = self.tower
        if not state.capturing or not (state.skip_last or t.q_out is None or t.k_out is None):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        scores = cls_attention_scores(
            hidden, norm=t.norm, q_proj=t.q_proj, k_proj=t.k_proj, num_heads=t.num_heads,
            kind=self.config.score, num_prefix_tokens=t.num_prefix_tokens, k_linear=t.k_linear,
        )  # fmt: skip
        state.scores.append(self.pool_scores(scores))

    @torch.no_grad()
    def _tap_hook(self, handle: GlobalComHandle, module: Any, args: tuple, output: torch.Tensor) -> None:
        """Eq. 1 from the q and k the running last layer computes itself: one ``(1 x S)`` matmul per tile and head."""
        state = handle.state
        if not state.capturing or state.skip_last:
            return
        t = self.tower
        assert t.q_out is not None and t.k_out is not None
        pending = state.pending
        if module is t.q_out.module:
            pending["q"] = t.q_out.take(output)[:, :1]  # the [CLS] query only
        if module is t.k_out.module:
            pending["k"] = t.k_out.take(output)
        if len(pending) == 2:
            q, k = pending.pop("q"), pending.pop("k")
            scores = cls_scores_from_qk(
                q, k, num_heads=t.num_heads, kind=self.config.score, num_prefix_tokens=t.num_prefix_tokens
            )
            state.scores.append(self.pool_scores(scores))

    def _skippable(self, handle: GlobalComHandle, original: Callable) -> Callable:
        """The last layer's ``forward``, which hands its input on unchanged while this thread's patched encode
        takes its features from an earlier layer (the layer's output would be discarded); any other call, e.g.
        the user's own tower call in this or another thread, runs the layer as usual."""

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            state = handle.state
            if state.capturing and state.skip_last:
                return args[0] if args else kwargs["hidden_states"]
            return original(*args, **kwargs)

        return forward

    def needs_last_layer(self, signature: inspect.Signature | None, args: tuple, kwargs: dict) -> bool:
        """Whether this ``get_image_features`` call takes features from the tower's last layer (its
        ``vision_feature_layer`` argument, else the model config's; an index ``l`` of the ``L + 1`` hidden states
        is the last layer's when ``l % (L + 1) == L``). Unknown call shapes count as needing it."""
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments if signature else {}
            layer = bound.get("vision_feature_layer")
        except TypeError:
            return True
        if layer is None:
            layer = getattr(self.model.config, "vision_feature_layer", -1)
        num = int(getattr(getattr(self.model.config, "vision_config", None), "num_hidden_layers", 0) or 0)
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        return num <= 0 or any(int(x) % (num + 1) == num for x in layers if x is not None)

    @torch.no_grad()
    def _cosine_hook(self, handle: GlobalComHandle, module: Any, args: tuple) -> None:
        state = handle.state
        if state.capturing:
            state.scores.append(cosine_scores(args[0]))

    def take_scores(self, handle: GlobalComHandle) -> torch.Tensor:
        """The ``(tiles, tokens)`` scores recorded by this thread's current encode (and clear them)."""
        state = handle.state
        if not state.scores:
            raise RuntimeError(
                "GlobalCom²: no token scores were captured for these image features; the features must come "
                "from the patched get_image_features of this model"
            )
        scores = torch.cat(state.scores, dim=0)
        state.scores = []
        return scores

    # -- the capture scope (wraps get_image_features) ----------------------------------------------------------
    def _encoding(self, handle: GlobalComHandle, original: Callable) -> Callable:
        try:
            signature: inspect.Signature | None = inspect.signature(original)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(original)  # keeps the signature: generate() inspects it to pre-encode images
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            state = handle.state
            extra = self.pop_encode_inputs(kwargs)
            saved = state.scores, state.skip_last, state.pending
            state.scores, state.pending = [], {}
            state.skip_last = self._skips_last_layer and not self.needs_last_layer(signature, args, kwargs)
            state.capturing += 1
            try:
                out = original(*args, **kwargs)
                return self.after_encode(handle, out, extra)
            finally:
                state.capturing -= 1
                state.scores, state.skip_last, state.pending = saved

        return get_image_features

    def pop_encode_inputs(self, kwargs: dict) -> dict:
        """Take family-only inputs off ``get_image_features``' keyword arguments (none by default)."""
        return {}

    def after_encode(self, handle: GlobalComHandle, out: Any, extra: dict) -> Any:
        """Post-process ``get_image_features``' output (families that select there; identity by default)."""
        return out

    # -- placeholder check (wraps get_placeholder_mask) --------------------------------------------------------
    def _placeholder_mask(self, handle: GlobalComHandle, original: Callable) -> Callable:
        @functools.wraps(original)
        def get_placeholder_mask(input_ids: Any, inputs_embeds: Any = None, image_features: Any = None,
                                 **kwargs: Any) -> Any:  # fmt: skip
            if image_features is not None:
                self.check_image_tokens(handle, input_ids, inputs_embeds, image_features)
            return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features, **kwargs)

        return get_placeholder_mask

    def check_image_tokens(
        self, handle: GlobalComHandle, input_ids: Any, inputs_embeds: Any, image_features: Any
    ) -> None:
        """Raise a clear error unless the prompts hold exactly the placeholder runs this thread's plans need."""
        token = self.model.config.image_token_id
        positions = placeholder_positions(self.inner, token, input_ids, inputs_embeds)
        rows = image_features.numel() // image_features.shape[-1]
        plans = handle.state.plans or []
        check_placeholders(positions, rows, plans, self.config, run_counts=self.placeholder_run_counts(plans))

    def placeholder_run_counts(self, plans: list[Any]) -> list[int]:
        """Length of every placeholder run these plans need, in prompt order (one run per image by default)."""
        return [p.num_tokens for p in plans]

    # -- forward / generate --------------------------------------------------------------------------------------
    @contextmanager
    def call_context(self, handle: GlobalComHandle, kwargs: dict) -> Iterator[None]:
        """Per-call family state around ``forward``/``generate`` (e.g. inputs HF must not see). None by default."""
        yield

    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        """Encode the images of a reference-mode call; pops what it consumed off ``kwargs``.

        Returns:
            ``mm_encoder_outputs`` for HF (``{"image": ...}``), or None to leave the call uncompressed.
        """
        raise NotImplementedError

    def _model_call(self, handle: GlobalComHandle, original: Callable, name: str) -> Callable:
        @functools.wraps(original)  # keeps the signature: generate() validates kwargs against forward's
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.call_context(handle, kwargs):
                if self.config.mode == "reference" or self.encodes_first:
                    return self._reference_call(handle, original, name, args, kwargs)
                return original(*args, **kwargs)

        return call

    def _reference_call(self, handle: GlobalComHandle, original: Callable, name: str, args: tuple,
                        kwargs: dict) -> Any:  # fmt: skip
        """Encode first, resize every image's placeholder run to its plan's count, then run HF's call."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if (
            kwargs.get("pixel_values") is None
            or input_ids is None
            or kwargs.get("mm_encoder_outputs") is not None
        ):
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        encoder_outputs = self.encode_for_reference(handle, kwargs)
        if encoder_outputs is None:
            return original(*args, **kwargs)
        plans = handle.state.plans or []
        shrunk = self.resize_placeholders(
            input_ids,
            plans,
            {
                k: kwargs[k]
                for k in ("attention_mask", "labels", "token_type_ids")
                if kwargs.get(k) is not None
            },
        )
        kwargs.update(shrunk)
        kwargs["mm_encoder_outputs"] = encoder_outputs
        out = original(*args, **kwargs)
        if name == "generate" and isinstance(out, torch.Tensor):
            # Hand back the caller's own prompt so `out[:, prompt_len:]` keeps working.
            out = torch.cat([input_ids, out[:, shrunk["input_ids"].shape[1] :]], dim=1)
        return out

    def resize_placeholders(
        self, input_ids: torch.Tensor, plans: list[Any], extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Resize every image's placeholder run from its uncompressed count to its plan's (re-padding the batch)."""
        return shrink_placeholders(
            input_ids,
            image_token_id=self.model.config.image_token_id,
            full_counts=[p.num_tokens_full for p in plans],
            new_counts=[p.num_tokens for p in plans],
            pad_token_id=pad_token_id(self.model, self.processor),
            extra=extra,
        )

    # -- inside the LLM (the LLM-side methods' pruner, globalcom2.methods.pruner) ---------------------------------
    def pruned_llm_masks(
        self, lm: Any, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any, layers: range,
        entries: dict[str, torch.Tensor] | None, token_type_ids: torch.Tensor | None,
    ) -> Any:  # fmt: skip
        """The attention masks of the decoder layers ``layers`` (one pruning stage) for a pruned sequence, where
        this family's LLM masks more than each layer kind's causal / sliding-window rule (which the pruner
        rebuilds itself); None by default.

        Args:
            lm: the decoder stack.
            hidden: ``(B, L, D)`` the pruned sequence.
            mask2d: Bool ``(B, L)`` visible entries (not padding, not a filler), or None (all visible); in decode,
                the pruned prompt plus the new tokens.
            cache: the call's cache (the stage's layers hold only the stage's tokens).
            layers: the stage's decoder layers.
            entries: in prefill, the pruner's per-entry records of the pruned sequence, each ``(B, L)``:
                ``origin`` (index in the caller's sequence, -1 for an inserted token), ``valid``, ``image``;
                None in decode.
            token_type_ids: the caller's ``token_type_ids`` ``(B, S)`` (None if it passed none).

        Returns:
            None, a mask for every layer, or ``{layer kind: mask}`` over the ``layer_types`` of the LLM's config.
        """
        return None

    def install_pruner_hooks(self, handle: GlobalComHandle, pruner: Any) -> None:
        """Family patches the LLM-side methods' pruner needs inside this family's LLM (none by default)."""

    # -- vision side only (plans without the LLM) ----------------------------------------------------------------
    def plan_for_image(self, handle: GlobalComHandle, image: Any) -> Any:
        """Run the vision side only for one image and return its `Plan`."""
        raise NotImplementedError

    @staticmethod
    def overlay_geometry(model: Any, image: Any, plan: Any) -> tuple[Any, int, tuple[int, int]]:
        """(image as the crops see it, tile size in pixels, crop canvas size) for the overlay of a plan.

        Default: the image is fitted into a ``rows x cols`` grid of square tiles (the overlay pads it as anyres does).
        """
        tile = int(model.config.vision_config.image_size)
        rows, cols = plan.grid
        return image, tile, (rows * tile, cols * tile)
