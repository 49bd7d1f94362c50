"""Idefics3 / SmolVLM adapter: GlobalCom² (paper Eq. 2-7) on HF ``Idefics3ForConditionalGeneration`` and
``SmolVLMForConditionalGeneration``, written as the diff from the InternVL adapter.

Idefics3's processor resizes an image (longest edge ``size``), stretches it to a multiple of the crop size
``max_image_size``, cuts it into ``rows x cols`` crops and appends the **global image last** (the whole image
squashed to one crop: the thumbnail). Images that fit one crop (and every image with ``do_image_splitting=False``)
are encoded as the global image alone. A SigLIP tower encodes every crop; the connector's pixel shuffle merges
each ``s x s`` group of patches into one LLM token (``image_seq_len = (g/s)**2`` per crop). The prompt frames every
crop's run of ``<image>`` tokens with text markers::

    <fake_token_around_image><row_1_col_1><image>...<fake_token_around_image><row_1_col_2><image>...\\n
    ...\\n\\n<fake_token_around_image><global-img><image>...<fake_token_around_image>

So the geometry is InternVL's (crops row-major, raster inside each, thumbnail last; no padding, no newlines), and
the adapter inherits its selection (:func:`~globalcom2.adapters.internvl.plan_internvl_batch`), its tile-grid
channel and its lone-tile rule. What differs:

**Scores.** SigLIP has no [CLS]: Eq. 7 (s_i = -cos(x_i, mean of the tile's tokens)) on the features the
connector receives (the tower's ``post_layernorm`` output, one per patch), then **summed over each s x s
pixel-shuffle group** (:func:`~globalcom2.adapters.internvl.merge_pool`), as InternVL pools its [CLS] row.

**Per-crop runs.** Every crop keeps its markers; only its run of ``<image>`` tokens changes length, to the crop's
k_j. In reference mode the model's ``forward``/``generate`` shrink each run of the plain processor's prompt from
``image_seq_len`` to int(N*r_j) (thumbnail: int(N*R), in descending score order). In budget mode the processor
emits exactly the compressed count per image, ``int(N*R) + int(R*n*N)`` (a function of the crop grid and R only;
:meth:`num_image_tokens_for_grid`), but how that count splits over the crops depends on the scores (Eq. 3-4),
which the processor cannot know: it writes a provisional split (thumbnail int(N*R), the crop budget spread evenly)
and the model's ``forward``/``generate`` encode the images first and move each marker to the head of its crop's
real run (:func:`~globalcom2.adapters.placeholders.resize_marked_runs`; the sequence keeps its length). Calls that
bypass the model's own ``forward``/``generate`` with budget-mode prompts are refused by the placeholder check
rather than mislabelled. An image encoded as the global image alone keeps its top int(N*R) tokens.

**Token budget** (``max_image_tokens=T``). Every marker of the layout above counts towards T, as the tokenizer
tokenises it (:meth:`layout_tokens`: the processor's own layout with one placeholder per run, tokenised once per crop
grid; ``3 + rows * (2 * cols + 1)`` tokens plus one when the tokenizer splits ``"\\n\\n"``, 3 for the global image
alone). So the overhead depends on the grid, not only on the tile count (2 x 3 crops: 18, 3 x 2: 19), and R is the
largest with ``layout + int(N*R) + int(R*n*N) <= T`` (:func:`~globalcom2.core.budget.ratio_for_max_tokens`),
computed from the grid alone by the processor's count and by the selection alike.

**Inputs.** The patched processor passes each image's crop grid on (``globalcom2_tile_grids``, from the image
processor's own ``rows``/``cols``); inputs without it (videos: SmolVLM's frames are single global images; or
images processed before :func:`globalcom2.apply`) pass through uncompressed with a warning, and a call that mixes
videos and images is refused, as on InternVL.

What is patched (recorded on the handle, undone by ``remove()``): a pre-hook on the connector,
``get_image_features``, ``inputs_merger`` (Idefics3) or ``get_placeholder_mask`` (SmolVLM) for the placeholder
check, the processor's ``_process_images`` (grids), ``replace_image_token`` and, where it exists,
``_get_num_multimodal_tokens`` (budget counts), and ``forward``/``generate``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from ..core.budget import budget_counts, split_budget
from ..core.plan import Plan
from ..core.scores import cosine_scores
from .base import GlobalComHandle
from .errors import IncompatibleProcessorError
from .family import FamilyAdapter
from .internvl import (
    GRID_KEY,
    InternVLAdapter,
    merge_pool,
    num_tiles,
)
from .placeholders import pad_token_id, resize_marked_runs
from .registry import register_adapter
from .towers import TowerInfo, describe_tower

#: Idefics3's crop markers go up to ``<row_6_col_6>`` in released tokenizers.
MAX_MARKER_SIDE = 6


def idefics3_layout_tokens(rows: int, cols: int, newline_pair_tokens: int = 1) -> int:
    """Prompt tokens of Idefics3's layout around one image's runs (module docstring), for a ``rows x cols`` crop
    grid (``(1, 1)`` or ``(0, 0)``: the global image alone), the markers being single tokens (rows, cols <= 6).

    ``<fake_token_around_image><row_r_col_c>`` per crop, a newline per crop row, ``"\\n"`` before and
    ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>`` around the global image; the last
    row's newline and the global image's form ``"\\n\\n"``, ``newline_pair_tokens`` tokens (1 when the tokenizer
    merges them). Pure: the count table of docs/max_image_tokens.md uses it; the adapter tokenises the processor's
    own layout instead (:meth:`Idefics3Adapter.layout_tokens`, equal to this in the tests).
    """
    if rows * cols <= 1:
        return 3
    return 3 + rows * (2 * cols + 1) + newline_pair_tokens - 1


def _processor_kwargs_class(proc: Any) -> Any:
    """The processor's ``ProcessingKwargs`` class, which ``_merge_kwargs`` needs: ``valid_processor_kwargs``
    (transformers >= 5.2x, where the argument is optional) or the ``<Processor>Kwargs`` class of its module (5.19)."""
    found = getattr(proc, "valid_processor_kwargs", None)
    for cls in type(proc).__mro__:
        if found is not None:
            break
        found = getattr(sys.modules.get(cls.__module__), f"{cls.__name__}Kwargs", None)
    if found is None:
        raise TypeError(f"GlobalCom²: cannot find the processing kwargs class of {type(proc).__name__}")
    return found


class _OneTokenRuns:
    """A processor seen with ``image_seq_len = 1``: its own ``replace_image_token`` then writes HF's exact layout
    (markers, newlines) with one placeholder per run, which :meth:`Idefics3Adapter._replace_image_runs` widens."""

    image_seq_len = 1

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


@register_adapter
class Idefics3Adapter(InternVLAdapter):
    """GlobalCom² for ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``."""

    family = "idefics3"
    token_layout: ClassVar[str] = "crops + global image; crop markers not counted"
    model_class_name = "Idefics3ForConditionalGeneration"
    processor_class_name = "Idefics3Processor"
    vision_tower_name = "vision_model"
    encodes_first = True  # budget mode too: the scores decide where each crop's markers go
    supports_max_image_tokens = True
    #: the module whose input Eq. 7 scores (the patch features, before the pixel shuffle / pooling it applies)
    projector_name: ClassVar[str] = "connector"
    #: the thumbnail's run comes before the crops' runs in the prompt (Gemma 3) rather than after (Idefics3)
    thumbnail_first: ClassVar[bool] = False
    #: values the inserted placeholders take in other inputs when runs are resized (e.g. Gemma 3's token types)
    inserted_values: ClassVar[dict[str, int]] = {}

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        FamilyAdapter.__init__(self, model, processor, config)
        self._init_geometry()

    @classmethod
    def without_model(
        cls,
        hf_config: Any,
        processor: Any,
        config: Any,
        layouts: dict[tuple[int, int], list[int]] | None = None,
    ) -> Any:
        """An adapter for the processor-side arithmetic and the planning alone (counts, layouts, provisional runs,
        :meth:`plan_images`, :meth:`placeholder_run_counts`), from the model's config instead of the model: what an
        engine that runs its own model (the vLLM plugin) needs to count and select exactly as :func:`globalcom2.apply`
        does. Nothing is checked or patched.

        Args:
            hf_config: the model's HF config (``vision_config``, ``image_token_id``, ...).
            processor: the HF processor, or None where ``layouts`` gives every grid's layout.
            config: a :class:`~globalcom2.GlobalComConfig`.
            layouts: crop grid -> :meth:`layout_ids` already known (e.g. handed over by a processor elsewhere).
        """
        self = cls.__new__(cls)
        self.model, self.processor, self.config = SimpleNamespace(config=hf_config), processor, config
        self._init_geometry()
        self._layout_ids.update({(int(g[0]), int(g[1])): list(ids) for g, ids in (layouts or {}).items()})
        return self

    def _init_geometry(self) -> None:
        vcfg = self.model.config.vision_config
        self.tile_hw = (int(vcfg.image_size),) * 2
        self.patch = int(vcfg.patch_size)
        self.patches_per_side = self.tile_hw[0] // self.patch
        self.factor = self.merge_factor()
        self.g = self.patches_per_side // max(self.factor, 1)  # merged tokens per crop side
        self._warned = False
        self.anchor_ids = torch.zeros(0, dtype=torch.long)  # ids of the markers runs follow (check_processor)
        self._layout_ids: dict[tuple[int, int], list[int]] = {}  # layout per crop grid (layout_ids)
        self._emitted: dict[tuple[int, int], list[int]] = {}  # provisional runs per crop grid (emitted_runs)

    def merge_factor(self) -> int:
        """Patches per side of one LLM token (the connector's pixel shuffle; other families: their pooling)."""
        return int(self.model.config.scale_factor)

    def describe_tower(self, tower: Any) -> TowerInfo:
        if type(tower).__name__ in ("Idefics3VisionTransformer", "SmolVLMVisionTransformer"):
            return TowerInfo(
                "siglip", None, None, None, None, int(tower.config.num_attention_heads), 0, False
            )
        return describe_tower(tower)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        if self.factor < 1 or self.patches_per_side % self.factor:
            raise ValueError(
                f"scale_factor={self.model.config.scale_factor} must be a positive integer dividing the "
                f"{self.patches_per_side} patches per crop side"
            )

    def processor_needed_because(self) -> str:
        return "the model never sees the crop grid, so the patched processor passes it on (`globalcom2_tile_grids`)"

    def check_processor(self) -> None:
        processor: Any = self.processor
        if int(processor.image_seq_len) != self.g * self.g:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: image_seq_len {processor.image_seq_len} vs {self.g}x{self.g} merged "
                "tokens per crop"
            )
        crop = int(processor.image_processor.max_image_size["longest_edge"])
        if crop != self.tile_hw[0]:
            raise IncompatibleProcessorError(
                f"processor/model mismatch: crop size max_image_size={crop} vs the tower's image_size "
                f"{self.tile_hw[0]}"
            )
        tok = processor.tokenizer
        glob = getattr(processor, "global_image_token", None) or processor.global_image_tag
        markers = [glob] + [
            f"<row_{r}_col_{c}>" for r in range(1, MAX_MARKER_SIDE + 1) for c in range(1, MAX_MARKER_SIDE + 1)
        ]
        ids = [tok.convert_tokens_to_ids(m) for m in markers]
        if any(i is None or i == tok.unk_token_id for i in ids[:2]):
            raise IncompatibleProcessorError(
                f"the tokenizer has no single tokens for the image markers {markers[:2]}; GlobalCom² locates each "
                "crop's placeholders by its marker"
            )
        self.anchor_ids = torch.tensor([i for i in ids if i is not None and i != tok.unk_token_id])

    # -- scores: Eq. 7 on the connector's input, summed per pixel-shuffle group --------------------------------
    def install_scoring(self, handle: GlobalComHandle) -> None:
        handle.add_hook(
            getattr(self.inner, self.projector_name).register_forward_pre_hook(
                functools.partial(self._connector_hook, handle)
            )
        )

    @torch.no_grad()
    def _connector_hook(self, handle: GlobalComHandle, module: Any, args: tuple) -> None:
        state = handle.state
        if state.capturing:
            state.scores.append(merge_pool(cosine_scores(args[0]), self.factor))

    # -- placeholder check: Idefics3 merges in inputs_merger, SmolVLM through get_placeholder_mask -------------
    def install_placeholder_check(self, handle: GlobalComHandle) -> None:
        if hasattr(self.inner, "get_placeholder_mask"):
            super().install_placeholder_check(handle)
            return
        original = self.inner.inputs_merger

        @functools.wraps(original)
        def inputs_merger(input_ids: Any, inputs_embeds: Any, image_hidden_states: Any) -> Any:
            self.check_image_tokens(handle, input_ids, inputs_embeds, image_hidden_states)
            return original(input_ids, inputs_embeds, image_hidden_states)

        handle.patch(self.inner, "inputs_merger", inputs_merger)

    def placeholder_run_counts(self, plans: list[Any]) -> list[int]:
        """Every run the plans need, in prompt order: each crop's kept tokens, then the thumbnail's."""
        if not plans:
            return []
        device = plans[0].thumbnail_mask.device
        runs = [
            self.in_run_order(p.crop_keep_counts.to(device), p.thumbnail_mask.sum().reshape(1)) for p in plans
        ]
        return [int(v) for v in torch.cat(runs).tolist()]  # one read for the batch

    # -- processor side ----------------------------------------------------------------------------------------
    def install_budget_counts(self, handle: GlobalComHandle) -> None:
        proc = self.processor
        handle.patch(
            proc,
            "replace_image_token",
            functools.partial(self._replace_image_runs, proc.replace_image_token),
        )
        if hasattr(proc, "_get_num_multimodal_tokens"):  # Idefics3Processor only
            handle.patch(
                proc,
                "_get_num_multimodal_tokens",
                functools.partial(self._num_multimodal_tokens, proc._get_num_multimodal_tokens),
            )

    def image_processor_options(self, names: Sequence[str], **kwargs: Any) -> dict:
        """The image processor options ``names`` the processor uses for a call with ``kwargs`` (its own merge of
        call, processor and image-processor defaults), e.g. the ones that decide the crop grid."""
        proc: Any = self.processor
        merged = proc._merge_kwargs(_processor_kwargs_class(proc), **kwargs)["images_kwargs"]
        ip = proc.image_processor
        return {k: merged.get(k, getattr(ip, k, None)) for k in names}

    # -- per-image counts: a function of the crop grid (and R or T) only --------------------------------------
    def grid_for_image(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of crops the image processor makes for a ``height x width`` image; (1, 1): the global
        image alone (the processor's ``rows = cols = 0``; a split image always has two crops or more)."""
        _, rows, cols = self.processor.image_processor.get_number_of_image_patches(height, width, {})
        return max(int(rows), 1), max(int(cols), 1)

    layout_label: ClassVar[str] = "crop markers and newlines included"

    def layout_tokens(self, grid: tuple[int, int]) -> int:
        """Prompt tokens of one image of this crop grid besides its ``<image>`` runs (they count towards
        ``max_image_tokens``): the processor's own layout (``<fake_token_around_image>``, ``<row_r_col_c>``,
        ``<global-img>``, the newlines) with one placeholder per run, tokenised by its tokenizer, the placeholders
        left out. So a ``"\\n\\n"`` the tokenizer merges, or a marker it splits (rows or columns above 6), counts
        as the prompt has it. Cached per grid."""
        return len(self.layout_ids(grid)) - num_tiles(*grid)

    def layout_ids(self, grid: tuple[int, int]) -> list[int]:
        """Token ids of one image of this crop grid as the processor lays it out, with one placeholder
        (``image_token_id``) per run: the layout the runs are widened in. Cached per grid."""
        grid = (int(grid[0]), int(grid[1]))
        if grid not in self._layout_ids:
            proc: Any = self.processor
            text = self.one_token_layout(type(proc).replace_image_token, self.layout_inputs(grid), 0)
            ids = [int(i) for i in proc.tokenizer(text, add_special_tokens=False)["input_ids"]]
            runs = ids.count(int(self.model.config.image_token_id))
            if runs != num_tiles(*grid):
                raise RuntimeError(f"GlobalCom²: expected {num_tiles(*grid)} placeholder runs, found {runs}")
            self._layout_ids[grid] = ids
        return list(self._layout_ids[grid])

    def layout_inputs(self, grid: tuple[int, int]) -> dict:
        """The processed-image fields ``replace_image_token`` reads, for one image of this crop grid."""
        rows, cols = grid if num_tiles(*grid) > 1 else (0, 0)  # the processor's "not split"
        return {"rows": [[rows]], "cols": [[cols]]}

    def grid_of_inputs(self, image_inputs: dict, image_idx: int) -> tuple[int, int]:
        """(rows, cols) of image ``image_idx`` of the processed-image fields ``replace_image_token`` receives."""
        rows = [r for sample in image_inputs["rows"] for r in sample][image_idx]
        cols = [c for sample in image_inputs["cols"] for c in sample][image_idx]
        return max(int(rows), 1), max(int(cols), 1)

    def one_token_layout(self, replace: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """The processor's own text for one image with one placeholder per run (``replace``: its
        ``replace_image_token``, bound or not)."""
        return getattr(replace, "__func__", replace)(
            _OneTokenRuns(self.processor), image_inputs, image_idx, **kwargs
        )

    @property
    def placeholder_text(self) -> str:
        """The placeholder the processor writes into each run."""
        return str(self.processor.image_token)

    def num_image_tokens_for_tiles(self, tiles: int) -> int:
        raise TypeError(
            "Idefics3's layout tokens depend on the crop grid (2 x 3 and 3 x 2 differ), not only the tile count: "
            "use num_image_tokens_for_grid((rows, cols))"
        )

    def emitted_runs(self, grid: tuple[int, int]) -> list[int]:
        """Placeholders the budget-mode processor writes per run for an image of this crop grid: the crop budget
        int(R*n*N) spread evenly, then the thumbnail's int(N*R) (the model moves the markers to the real split)."""
        if grid not in self._emitted:  # host arithmetic, once per grid
            n_tok = self.g * self.g
            n = num_tiles(*grid) - 1
            thumb, crops = budget_counts(n_tok, n * n_tok, self.ratio_for_grid(grid))
            even = torch.full((n,), n_tok, dtype=torch.long)
            split = split_budget(crops, even.double(), even) if n else even
            self._emitted[grid] = self.in_run_order(split, torch.tensor([thumb])).tolist()
        return list(self._emitted[grid])

    def in_run_order(self, crops: torch.Tensor, thumbnail: torch.Tensor) -> torch.Tensor:
        """Per-run values of one image in prompt order: the crops' then the thumbnail's (or the thumbnail's first)."""
        return torch.cat([thumbnail, crops] if self.thumbnail_first else [crops, thumbnail])

    def _replace_image_runs(self, original: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        counts = self.emitted_runs(self.grid_of_inputs(image_inputs, image_idx))
        token = self.placeholder_text
        layout = self.one_token_layout(original, image_inputs, image_idx, **kwargs)
        parts = layout.split(token)
        if len(parts) != len(counts) + 1:
            raise RuntimeError(f"GlobalCom²: expected {len(counts)} placeholder runs, found {len(parts) - 1}")
        return "".join(part + token * c for part, c in zip(parts, counts, strict=False)) + parts[-1]

    def _num_multimodal_tokens(self, original: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
        out = original(image_sizes=image_sizes, **kwargs)
        if getattr(out, "num_image_patches", None) is not None:  # the prompt's count: markers + budget runs
            proc: Any = self.processor
            merged = proc._merge_kwargs(
                _processor_kwargs_class(proc), **kwargs
            )  # as HF's own count reads them
            images_kwargs = merged["images_kwargs"]
            ip = proc.image_processor
            grids = [ip.get_number_of_image_patches(*size, images_kwargs)[1:] for size in image_sizes]
            out.num_image_tokens = [
                self.layout_tokens(g) + self.num_image_tokens_for_grid(g)
                for g in ((max(int(r), 1), max(int(c), 1)) for r, c in grids)
            ]
        return out

    def _process_images(self, original: Any, images: Any, **kwargs: Any) -> Any:
        processed, replacements = original(images, **kwargs)
        if "rows" in processed:  # the image processor's own split; (0, 0) = the global image alone
            processed[GRID_KEY] = [
                [max(int(r), 1), max(int(c), 1)]
                for rs, cs in zip(processed["rows"], processed["cols"], strict=True)
                for r, c in zip(rs, cs, strict=True)
            ]
        return processed, replacements

    # -- model side --------------------------------------------------------------------------------------------
    def _select(self, handle: GlobalComHandle, features: Any, scores: torch.Tensor | None, grids: Any) -> Any:
        """Keep each image's selected tokens: a list of one ``(kept, D)`` tensor per sample, the shape of HF's
        ``pooler_output`` here (InternVL's is one tensor). transformers < 5.20 hands one ``(tiles, N, D)`` tensor:
        then ``(num_kept_tokens, 1, D)`` as on InternVL."""
        if isinstance(features, torch.Tensor):
            return super()._select(handle, features, scores, grids)
        n_tok = self.g * self.g
        per_sample = list(features)
        flat = torch.cat(per_sample).reshape(-1, n_tok, per_sample[0].shape[-1])
        kept = super()._select(handle, flat, scores, grids)[:, 0]
        plans: list[Plan] = handle.state.plans or []
        # Images fill the samples in order: split the kept tokens where each sample's tiles end.
        tiles = torch.tensor([int(f.shape[0]) // n_tok for f in per_sample])
        image_tiles = torch.tensor([num_tiles(*p.grid) if p.num_crops else 1 for p in plans])
        image_end = torch.cumsum(image_tiles, 0)
        sample_of = torch.searchsorted(torch.cumsum(tiles, 0), image_end - 1, right=True)
        tokens = torch.zeros(len(per_sample), dtype=torch.long).index_add_(
            0, sample_of, torch.tensor([p.num_tokens for p in plans], dtype=torch.long)
        )
        return list(kept.split(tokens.tolist()))

    def resize_placeholders(
        self, input_ids: torch.Tensor, plans: list[Any], extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Give every crop's run its plan's length; the markers stay (module docstring)."""
        n_tok = self.g * self.g
        old: list[int] = []
        for p in plans:
            grid = p.grid if p.num_crops else (1, 1)
            old += self.emitted_runs(grid) if self.config.mode == "budget" else [n_tok] * num_tiles(*grid)
        hint = (
            "make the inputs with the processor patched by this apply() (call it again after apply())"
            if self.config.mode == "budget"
            else "in reference mode make the inputs with the plain processor"
        )
        return resize_marked_runs(
            input_ids, image_token_id=self.model.config.image_token_id, anchor_ids=self.anchor_ids,
            old_counts=old, new_counts=self.placeholder_run_counts(plans),
            pad_token_id=pad_token_id(self.model, self.processor), extra=extra, hint=hint,
            inserted=self.inserted_values,
        )  # fmt: skip

    def encode_for_reference(self, handle: GlobalComHandle, kwargs: dict) -> dict[str, Any] | None:
        if handle.state.context.get(GRID_KEY) is None:
            return None  # no crop grids: left uncompressed (see the module docstring)
        features = self.inner.get_image_features(
            pixel_values=kwargs.pop("pixel_values"),
            pixel_attention_mask=kwargs.pop("pixel_attention_mask", None),
            return_dict=True,
        )
        return {"image": features}


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    """GlobalCom² for ``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor`` (Idefics3's layout)."""

    family = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    processor_class_name = "SmolVLMProcessor"


ADAPTER = Idefics3Adapter
