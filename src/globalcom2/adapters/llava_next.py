"""LLaVA-NeXT (anyres) adapter: GlobalCom² on an unmodified Hugging Face `LlavaNextForConditionalGeneration`.

What is patched (all recorded on the handle, undone by `remove()`):

- a forward pre-hook on the vision tower's **last** layer computes the [CLS]-row scores of paper Eq. 1 from that
  layer's input under any attention implementation (SDPA/Flash stay on; no ``output_attentions``); for
  ``importance="cosine"`` a pre-hook on the projector computes Eq. 7 on the selected feature layer instead;
- ``LlavaNextModel.pack_image_features`` (instance attribute) selects and orders the kept tokens (Eq. 2-6);
- ``LlavaNextModel.get_placeholder_mask`` (instance attribute) first checks that the prompts hold exactly the
  placeholders the plans need, image by image, and says how to fix it when they do not (HF's own check compares
  totals only, with a terse message, and can be switched off by an environment variable);
- budget mode: ``LlavaNextProcessor._get_number_of_features`` (instance attribute) returns the compressed count,
  so prompts carry exactly as many ``<image>`` placeholders as features are produced;
- reference mode: ``generate`` and ``forward`` resize each image's placeholder run to the plan's count, because
  the official per-crop counts depend on the scores and cannot be known by the processor.

The scoring hooks keep only the scores of the latest vision-tower call (``handle._pending_scores`` holds at most one
tensor), so a tower run outside a full forward (or an interrupted forward) can neither grow memory nor leak stale
scores into the next plan. Not thread-safe: one patched model serves one forward at a time.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..config import GlobalComConfig
from ..core.budget import budget_num_tokens, full_num_tokens
from ..core.plan import Plan
from ..core.planner import plan_image, plan_single_tile
from ..core.scores import cls_attention_scores, cosine_scores
from .base import GlobalComHandle
from .towers import TowerInfo, describe_tower


def _hf():
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next import modeling_llava_next

    return LlavaNextForConditionalGeneration, LlavaNextProcessor, select_best_resolution, modeling_llava_next


def image_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """Crop grid (rows, cols) that LLaVA-NeXT's anyres picks for an image of ``(height, width)``."""
    *_, select_best_resolution, _ = _hf()
    best_h, best_w = select_best_resolution(list(image_size), pinpoints)
    return best_h // tile, best_w // tile


class LlavaNextAdapter:
    """Everything GlobalCom² needs to know about LLaVA-NeXT; instantiated by :func:`globalcom2.apply`."""

    family = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"

    @classmethod
    def is_supported(cls, model: Any) -> bool:
        # Exact class: subclasses for other families (e.g. OneVision variants) pack features differently.
        return type(model).__name__ == cls.model_class_name and type(model) is _hf()[0]

    def __init__(self, model: Any, processor: Any, config: GlobalComConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.inner = model.model  # LlavaNextModel
        vcfg = model.config.vision_config
        self.tile = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.g = self.tile // self.patch_size
        self.pinpoints = model.config.image_grid_pinpoints
        self.tower: TowerInfo = describe_tower(self.inner.vision_tower)
        self.importance = self._resolve_importance()

    # -- checks (run before anything is patched) ---------------------------------------------------------------
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

    def check(self) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported: GlobalCom² scores the patch tokens "
                "of each tile and needs the [CLS] token dropped ('default')"
            )
        if self.config.mode == "budget" and self.processor is None:
            raise ValueError("mode='budget' needs the processor (it emits the compressed placeholder count)")
        if self.processor is None:
            return
        self.check_processor(_hf()[1], strategy)
        ip = self.processor.image_processor
        if self.processor.patch_size is not None and int(self.processor.patch_size) != self.patch_size:
            raise ValueError(
                f"processor/model mismatch: patch_size {self.processor.patch_size} vs {self.patch_size}"
            )
        crop = _height_width(getattr(ip, "crop_size", None))
        if crop is not None and crop != (self.tile, self.tile):
            raise ValueError(
                f"processor/model mismatch: the image processor cuts {crop[0]}x{crop[1]} px tiles, "
                f"the vision tower takes {self.tile}x{self.tile}"
            )

    def check_processor(self, processor_class: Any, strategy: str) -> None:
        """The processor checks every anyres family shares: class, pinpoints, image token, feature strategy."""
        processor: Any = self.processor
        if not isinstance(processor, processor_class):
            raise TypeError(
                f"processor must be a {processor_class.__name__} for {type(self.model).__name__}, "
                f"got {type(processor).__name__}"
            )
        ip = processor.image_processor
        if [list(p) for p in ip.image_grid_pinpoints] != [list(p) for p in self.pinpoints]:
            raise ValueError(
                f"processor/model mismatch: image_grid_pinpoints differ ({ip.image_grid_pinpoints} vs {self.pinpoints})"
            )
        token_id = getattr(processor, "image_token_id", None)
        if token_id is not None and int(token_id) != int(self.model.config.image_token_id):
            raise ValueError(
                f"processor/model mismatch: image_token_id {token_id} vs {self.model.config.image_token_id}"
            )
        p_strategy = getattr(self.processor, "vision_feature_select_strategy", None)
        if p_strategy is not None and p_strategy != strategy:
            raise ValueError(
                f"processor/model mismatch: vision_feature_select_strategy {p_strategy!r} vs {strategy!r} "
                "(the processor's placeholder count would be off by one per image)"
            )

    # -- installation ------------------------------------------------------------------------------------------
    def install(self, handle: GlobalComHandle) -> None:
        if self.importance == "cls":
            hook = self.tower.last_layer.register_forward_pre_hook(
                functools.partial(self._cls_hook, handle), with_kwargs=True
            )
        else:
            hook = self.inner.multi_modal_projector.register_forward_pre_hook(
                functools.partial(self._cosine_hook, handle)
            )
        handle.add_hook(hook)
        handle.patch(self.inner, "pack_image_features", functools.partial(self._pack, handle))
        handle.patch(
            self.inner,
            "get_placeholder_mask",
            functools.partial(self._placeholder_mask, handle, self.inner.get_placeholder_mask),
        )
        if self.config.mode == "budget":
            original = self.processor._get_number_of_features
            handle.patch(
                self.processor, "_get_number_of_features", functools.partial(self._num_features, original)
            )
        else:
            for name in ("forward", "generate"):
                original = getattr(self.model, name)
                handle.patch(
                    self.model, name, functools.partial(self._shrinking_call, handle, original, name)
                )

    # -- scoring hooks ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _cls_hook(self, handle: GlobalComHandle, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        t = self.tower
        # Replace, not append: only the latest tower call is packed next (no growth, no stale scores).
        handle._pending_scores[:] = [
            cls_attention_scores(
                hidden,
                norm=t.norm,
                q_proj=t.q_proj,
                k_proj=t.k_proj,
                num_heads=t.num_heads,
                kind=self.config.score,
                num_prefix_tokens=t.num_prefix_tokens,
            )  # fmt: skip
        ]

    @torch.no_grad()
    def _cosine_hook(self, handle: GlobalComHandle, module, args) -> None:
        handle._pending_scores[:] = [cosine_scores(args[0])]

    # -- counts ------------------------------------------------------------------------------------------------
    def _num_features(self, original, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Processor-side count in budget mode: HF's count with our crop/thumbnail terms swapped in."""
        rows, cols = image_grid((orig_height, orig_width), self.pinpoints, height)
        g = height // self.processor.patch_size
        hf = original(orig_height, orig_width, height, width)
        return (
            hf - full_num_tokens(orig_height, orig_width, rows, cols, g)
            + self.count_tokens(orig_height, orig_width, rows, cols, g)
        )  # fmt: skip

    def count_tokens(self, height: int, width: int, rows: int, cols: int, g: int) -> int:
        """Budget-mode image tokens of one image (the count baselines in :mod:`globalcom2.methods` override)."""
        return budget_num_tokens(height, width, rows, cols, g, self.config.ratio)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the LLM receives for one image of ``height x width`` in budget mode."""
        rows, cols = image_grid((height, width), self.pinpoints, self.tile)
        return self.count_tokens(height, width, rows, cols, self.g)

    def plan_tiles(self, tile_scores: torch.Tensor, image_size: tuple[int, int]) -> tuple[Plan, torch.Tensor]:
        """Plan and emission index of one image from its ``(1 + n, g*g)`` tile scores (the step baselines override)."""
        if tile_scores.shape[0] == 1:
            return plan_single_tile(self.g, device=tile_scores.device)
        cfg = self.config
        return plan_image(
            tile_scores[0], tile_scores[1:], grid=image_grid(image_size, self.pinpoints, self.tile),
            image_size=image_size, ratio=cfg.ratio, mode=cfg.mode, allocation=cfg.allocation,
            scoring=cfg.scoring, alpha=cfg.alpha, tau=cfg.tau,
        )  # fmt: skip

    # -- selection and packing (replaces LlavaNextModel.pack_image_features) -----------------------------------
    def _pack(
        self, handle: GlobalComHandle, image_features, image_sizes, vision_feature_select_strategy=None,
        image_newline=None,
    ):  # fmt: skip
        if not handle._pending_scores:
            raise RuntimeError(
                "GlobalCom²: no token scores were captured for these image features; pack_image_features must "
                "be called on the output of the patched vision tower"
            )
        scores = torch.cat(handle._pending_scores, dim=0)
        handle._pending_scores.clear()
        sizes = (
            image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        )
        plans, packed, lens = [], [], []
        offset = 0
        for feats, (h, w) in zip(image_features, sizes, strict=True):
            num_tiles = feats.shape[0]
            tile_scores = scores[offset : offset + num_tiles].to(feats.device)
            offset += num_tiles
            plan, index = self.plan_tiles(tile_scores, (int(h), int(w)))
            flat = feats.flatten(0, 1)
            if image_newline is not None:
                flat = torch.cat([flat, image_newline[None].to(flat)], dim=0)
            else:
                index = index[index < flat.shape[0]]
            packed.append(flat[index])
            lens.append(int(index.numel()))
            plans.append(plan)
        if offset != scores.shape[0]:
            raise RuntimeError(f"GlobalCom²: {scores.shape[0]} tiles were scored but {offset} were packed")
        handle.plans = plans
        return packed, torch.tensor(lens, dtype=torch.long, device=image_features[0].device)

    # -- placeholder check (wraps LlavaNextModel.get_placeholder_mask) -----------------------------------------
    def _placeholder_mask(self, handle: GlobalComHandle, original, input_ids, inputs_embeds=None,
                          image_features=None):  # fmt: skip
        if image_features is not None:
            image_token_id = self.model.config.image_token_id
            if input_ids is not None:
                is_img = input_ids == image_token_id
            else:  # same rule as HF: a position holds an image token if its embedding is that token's
                table = self.inner.get_input_embeddings()
                token = table(torch.tensor(image_token_id, device=inputs_embeds.device))
                is_img = (inputs_embeds == token).all(-1)
            check_placeholders(is_img, int(image_features.shape[0]), handle.plans, self.config)
        return original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)

    # -- reference mode: resize placeholder runs to the plan's counts ------------------------------------------
    def _shrinking_call(self, handle: GlobalComHandle, original, name: str, *args, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if pixel_values is None or input_ids is None or kwargs.get("mm_encoder_outputs") is not None:
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        image_sizes = kwargs.pop("image_sizes")
        kwargs.pop("pixel_values")
        features = self.inner.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=kwargs.pop("vision_feature_layer", None),
            vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
            return_dict=True,
        )
        new_counts = [p.num_tokens for p in handle.plans]
        full_counts = [p.num_tokens_full for p in handle.plans]
        shrunk = shrink_placeholders(
            input_ids,
            image_token_id=self.model.config.image_token_id,
            full_counts=full_counts,
            new_counts=new_counts,
            pad_token_id=_pad_id(self.model, self.processor),
            extra={
                k: kwargs[k]
                for k in ("attention_mask", "labels", "token_type_ids")
                if kwargs.get(k) is not None
            },
        )
        kwargs.update(shrunk)
        kwargs["mm_encoder_outputs"] = {"image": features}
        out = original(*args, **kwargs)
        if name == "generate" and isinstance(out, torch.Tensor):
            # Hand back the caller's own prompt so `out[:, prompt_len:]` keeps working.
            out = torch.cat([input_ids, out[:, shrunk["input_ids"].shape[1] :]], dim=1)
        return out


def _height_width(size: Any) -> tuple[int, int] | None:
    """``(height, width)`` of an image processor's ``crop_size`` (dict or SizeDict), None if it has none."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    h, w = (get("height"), get("width")) if size is not None else (None, None)
    return (int(h), int(w)) if h is not None and w is not None else None


def check_placeholders(
    is_img: torch.Tensor, num_features: int, plans: list[Plan], config: GlobalComConfig
) -> None:
    """Raise a clear ValueError unless the prompts hold exactly one placeholder per image feature, image by image.

    Args:
        is_img: Bool ``(batch, seq)``: positions holding the image token.
        num_features: rows of the concatenated image features about to be scattered into those positions.
        plans: the plans of the pack that produced the features (their ``num_tokens`` are the per-image counts);
            if they do not add up to ``num_features`` (features from elsewhere) only the total is checked.
        config: for the message.

    HF fills placeholders in row-major order, so every image's features must land on one run of placeholders of
    its own length (adjacent images may share a run). A mismatch raises instead of scattering wrong tokens.
    """
    counts = [p.num_tokens for p in plans]
    per_image = sum(counts) == num_features
    n = int(is_img.sum())
    where = f"GlobalCom² (mode={config.mode!r}, ratio={config.ratio})"
    if n != num_features:
        full = sum(p.num_tokens_full for p in plans) if per_image else -1
        if n == full and config.mode == "budget":
            hint = (
                "they carry the uncompressed count, i.e. they were made by the processor before "
                "globalcom2.apply() (or by another processor object): call the processor again after apply(), "
                "and again after remove()"
            )
        elif n == full:
            hint = (
                "they carry the uncompressed count: in reference mode call the model's own forward/generate, "
                "which resize each image's placeholder run (not the inner LlavaNextModel)"
            )
        elif config.mode == "budget":
            hint = (
                "build the inputs with the processor patched by this apply() (call it again after apply() and "
                "after remove()), with one <image> in the text per image"
            )
        else:
            hint = (
                "build the inputs with the plain processor, with one <image> in the text per image, and call the "
                "model's own forward/generate"
            )
        raise ValueError(
            f"{where}: the prompts hold {n} image tokens but the images give {num_features} features; {hint}"
        )
    if per_image and counts:
        _check_runs(is_img, counts, where)


def _check_runs(is_img: torch.Tensor, counts: list[int], where: str) -> None:
    """Every run of placeholders must end on an image boundary (row-major order), else ValueError."""
    nxt = torch.zeros_like(is_img)
    nxt[..., :-1] = is_img[..., 1:]
    ends = (is_img & ~nxt).reshape(-1)
    end_counts = is_img.reshape(-1).long().cumsum(0)[ends]  # image tokens seen up to each run's end
    bounds = torch.tensor(counts, device=end_counts.device).cumsum(0)
    if not bool(torch.isin(end_counts, bounds).all()):
        runs = torch.diff(end_counts, prepend=end_counts.new_zeros(1)).tolist()
        raise ValueError(
            f"{where}: the placeholder runs in the prompts (lengths {runs}) do not line up with the images' "
            f"token counts {counts}; make the text and the pixel values in one processor call"
        )


def _pad_id(model, processor) -> int:
    tok = getattr(processor, "tokenizer", None)
    for cand in (getattr(tok, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                 getattr(getattr(model.config, "text_config", None), "pad_token_id", None)):  # fmt: skip
        if cand is not None:
            return int(cand)
    return 0


def shrink_placeholders(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    full_counts: list[int],
    new_counts: list[int],
    pad_token_id: int,
    extra: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Resize every image's run of placeholders from its full count to its new count, then re-pad the batch.

    Usually the run shrinks; it grows when the reference count exceeds HF's (reference mode writes a newline after
    every padded row, HF only after unpadded ones: with R near 1 and a padded crop grid the official sequence is
    longer). Images are matched to placeholder runs in row-major order (as HF's ``masked_scatter`` does). Padding
    keeps the side the batch used (left if any row starts with attention_mask == 0).

    Returns:
        ``input_ids`` and the resized tensors of ``extra`` (attention_mask, labels, ...).
    """
    is_img = input_ids == image_token_id
    total_full = sum(full_counts)
    if int(is_img.sum()) != total_full:
        raise ValueError(
            f"GlobalCom² (mode='reference'): the prompts hold {int(is_img.sum())} image tokens but these images "
            f"need {total_full} (their uncompressed count); in reference mode build the inputs with the plain "
            "processor (not one patched by a budget-mode apply()), with one <image> in the text per image"
        )
    _check_runs(is_img, list(full_counts), "GlobalCom² (mode='reference')")
    device = input_ids.device
    full = torch.tensor(full_counts, device=device)
    new = torch.tensor(new_counts, device=device)
    image_of = torch.repeat_interleave(torch.arange(len(full_counts), device=device), full)
    starts = torch.cumsum(full, 0) - full
    within = torch.arange(total_full, device=device) - starts[image_of]
    # Copies of every token: 1, 0 for placeholders cut off, and the last placeholder of a run that grows repeats.
    reps_flat = (within < new[image_of]).long()
    grow = (new - full).clamp_min(0)[image_of]
    reps_flat = reps_flat + torch.where(within == full[image_of] - 1, grow, torch.zeros_like(grow))
    reps = torch.ones_like(input_ids, dtype=torch.long)
    reps[is_img] = reps_flat
    attn = extra.get("attention_mask")
    left_pad = attn is not None and bool((attn[:, 0] == 0).any())
    lengths = reps.sum(1)
    width = int(lengths.max())
    out: dict[str, torch.Tensor] = {}
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0}
    for key, tensor in {"input_ids": input_ids, **extra}.items():
        res = torch.full((tensor.shape[0], width), fills.get(key, 0), dtype=tensor.dtype, device=device)
        for b in range(tensor.shape[0]):  # one slice per sample, not per token
            row = tensor[b].repeat_interleave(reps[b])
            if left_pad:
                res[b, width - row.numel() :] = row
            else:
                res[b, : row.numel()] = row
        out[key] = res
    return out


ADAPTER = LlavaNextAdapter
