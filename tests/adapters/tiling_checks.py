"""The checks the tiling families (Gemma 3, Aya Vision, Cohere2 Vision, Llama 4) share, each with the family's own
geometry and prompt layout passed in, so a family's test module holds only what is its own.

- :func:`replay_tiling_plans`: apply, capture what the LLM reads, replay the plan against the plain rule;
- :func:`check_llm_reads`: the prompt and the feature rows the LLM reads;
- :func:`check_budget_counts`: the processor's count == the features == the saved prompt length;
- :func:`check_max_image_tokens`: each image's span is at most T, too small a T is refused;
- :func:`check_generate_with_labels`: ``generate`` and a forward with labels on a left-padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.adapters.internvl import GRID_KEY
from tests.adapters.plain_families import check_tiles_plan, forward_and_capture, plain_pool, spy

Inputs = Callable[..., dict]  # (processor, images, **options) -> the processor's output


@dataclass(frozen=True)
class TilingFamily:
    """A tiling family's geometry and taps, as its test module knows them.

    ``patch_scores`` is ``(module, name)`` of the function whose output is the per-patch score the library ranks
    (spied); ``plain_patch_scores(model, inputs)`` recomputes it plainly from the tower; ``capture(model)`` the
    ``(seen, hooks)`` of ``capture_llm_inputs``; ``g`` merged tokens per tile side after the ``shuffle`` x
    ``shuffle`` pooling / pixel-shuffle groups. ``thumbnail_first``: the global view is tile 0 (Gemma 3), else the
    last tile.
    """

    inputs: Inputs
    prompt: str
    placeholder: str  # the image's placeholder in ``prompt``
    g: int
    shuffle: int
    patch_scores: tuple[Any, str]
    pool_module: Any
    plain_patch_scores: Callable[[Any, dict], np.ndarray]
    capture: Callable[[Any], Any]
    owner: Callable[[Any], Any] = lambda model: model.model  # the module with ``get_image_features``
    output: str = "pooler_output"  # the field of its output holding the features
    thumbnail_first: bool = False
    score_tolerance: dict = field(default_factory=lambda: {"atol": 2e-6})

    @property
    def n(self) -> int:
        return self.g * self.g

    def features(self, model: Any, inputs: dict, patched: bool = True) -> torch.Tensor:
        """The image features as (tiles * N, D) rows: through the (patched) model, or the unpatched class's
        ``get_image_features`` (every token of every tile, in tile order)."""
        owner = self.owner(model)
        if patched:
            out = owner.get_image_features(inputs["pixel_values"], **{GRID_KEY: inputs[GRID_KEY]})
        else:
            out = type(owner).get_image_features(owner, inputs["pixel_values"])
        rows = getattr(out, self.output)
        return rows.reshape(-1, rows.shape[-1])


@dataclass
class Replayed:
    """One image's run: what the LLM read (``seen``), the raw features, and the plain replay of the plan."""

    where: str
    inputs: dict
    seen: dict
    features: torch.Tensor
    grid: tuple[int, int]
    order: list[int]
    keep: np.ndarray | None
    crop_counts: list[int]
    thumb_count: int


#: (height, width) of the replayed images at the tiny scale (64 px tiles): 1 x n or 2 x 3, n x 1 or 3 x 2, a long
#: strip, a single tile
REPLAY_SIZES = ((100, 190), (190, 100), (60, 250), (64, 64))


def replay_tiling_plans(
    family: TilingFamily,
    model: Any,
    processor: Any,
    monkeypatch: Any,
    *,
    mode: str,
    ratio: float,
    allocation: str,
    sizes: Sequence[tuple[int, int]] = REPLAY_SIZES,
    options: Callable[[int], dict] = lambda k: {},
    label: Callable[[int], str] | None = None,
) -> Iterator[Replayed]:
    """For every scoring and image: apply GlobalCom², run the model on the image alone, check the scores the
    library used against the plain ones (first run: patch scores, then their sum per pooling / pixel-shuffle
    group) and the plan against the plain rule (:func:`check_tiles_plan`), and yield the run for the family's
    own sequence checks. ``options(k)``: the processor options for image k; ``label(k)``: its name in messages
    (default: its size)."""
    from tests.conftest import random_image

    images = [random_image(*hw, seed=k) for k, hw in enumerate(sizes)]
    label = label or (lambda k: str(sizes[k]))
    used_patch = spy(monkeypatch, *family.patch_scores)
    used = spy(monkeypatch, family.pool_module, "merge_pool")
    checked = False
    for scoring in ("holistic", "local", "global"):
        for k, image in enumerate(images):
            with globalcom2.apply(
                model, processor, ratio=ratio, mode=mode, allocation=allocation, scoring=scoring
            ) as gc:
                inputs = family.inputs(processor, [image], **options(k))
                rows, cols = inputs[GRID_KEY][0].tolist()
                del used[:], used_patch[:]
                seen = forward_and_capture(model, inputs, family.capture(model))
                plan = gc.plans[0]
            with torch.no_grad():
                raw = family.features(model, inputs, patched=False)
                if not checked:
                    patch = used_patch[0].numpy()
                    np.testing.assert_allclose(
                        patch, family.plain_patch_scores(model, inputs), **family.score_tolerance
                    )
                    np.testing.assert_allclose(
                        used[0].numpy(), plain_pool(patch, family.shuffle), rtol=1e-5, atol=1e-6
                    )
                    checked = True
            scores = used[0].numpy()
            thumb, crops = (scores[0], scores[1:]) if family.thumbnail_first else (scores[-1], scores[:-1])
            where = f"{label(k)} R={ratio} {mode} {allocation} {scoring}"
            order, keep, ks, k0 = check_tiles_plan(
                plan, thumb, crops, (rows, cols), family.g, ratio, mode, allocation, scoring, where
            )
            yield Replayed(where, inputs, seen, raw, (rows, cols), order, keep, ks, k0)
    assert checked


def check_llm_reads(run: Replayed, processor: Any, token: int, text: str, rows: Sequence[int]) -> None:
    """The LLM reads exactly ``text`` (as the tokenizer writes it; padding aside), and at its placeholders the
    feature ``rows`` of the unpatched model, in that order."""
    ids = run.seen["input_ids"][0][run.seen["attention_mask"][0].bool()].tolist()
    assert ids == processor.tokenizer(text)["input_ids"], run.where
    embeds = run.seen["inputs_embeds"][0][run.seen["input_ids"][0] == token]
    torch.testing.assert_close(embeds, run.features[list(rows)].to(embeds.dtype), msg=run.where)


@dataclass
class BudgetCounts:
    plans: list
    counted: list[int]  # placeholders per row
    saved: list[int]  # prompt tokens saved per row
    formula: list[int]  # the adapter's count for each size
    features: int  # rows of image features the model produced


def check_budget_counts(
    family: TilingFamily,
    model: Any,
    processor: Any,
    sizes: Sequence[tuple[int, int]],
    ratio: float,
    **options: Any,
) -> BudgetCounts:
    """Budget mode on one batch of ``sizes``: the features equal the plans' counts in total; returns the per-image
    counts for the family's own formula checks (placeholders, prompt tokens saved against the unpatched
    processor, the adapter's ``num_image_tokens``)."""
    from tests.conftest import random_image

    token = model.config.image_token_id
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    full = family.inputs(processor, images, **options)
    with globalcom2.apply(model, processor, ratio=ratio) as gc:
        inputs = family.inputs(processor, images, **options)
        with torch.no_grad():
            rows = family.features(model, inputs).shape[0]
        plans = list(gc.plans)
        formula = [gc.adapter.num_image_tokens(*s, **options) for s in sizes]
    assert rows == sum(p.num_tokens for p in plans)
    counted = (inputs["input_ids"] == token).sum(1).tolist()
    saved = (full["attention_mask"].sum(1) - inputs["attention_mask"].sum(1)).tolist()
    for k, plan in enumerate(plans):
        assert counted[k] == plan.num_tokens == formula[k], sizes[k]
        assert saved[k] == plan.num_tokens_full - plan.num_tokens, sizes[k]
    return BudgetCounts(plans, counted, saved, formula, rows)


def check_max_image_tokens(
    family: TilingFamily,
    model: Any,
    processor: Any,
    sizes: Sequence[tuple[int, int]],
    max_tokens: int,
    *,
    layout: Callable[[tuple[int, int]], int] | None = None,
    slack: int | None = 1,
    **options: Any,
) -> None:
    """Under ``max_image_tokens=T`` each image's span (markers and runs as the prompt tokenises them) is at most T,
    the placeholder count == the features == the adapter's count, and an image whose layout alone exceeds T is
    refused ("too small"). ``layout(grid)``: the family's marker count, checked against the adapter's;
    ``slack``: how far below T a compressed span may end (rounding of the runs), None: not checked."""
    from tests.conftest import random_image

    token = model.config.image_token_id
    bare = len(processor.tokenizer(family.prompt.replace(family.placeholder, ""))["input_ids"])
    with globalcom2.apply(model, processor, max_image_tokens=max_tokens) as gc:
        for k, size in enumerate(sizes):
            image = random_image(*size, seed=k)
            grid = gc.adapter.grid_for_image(*size, **options)
            if layout is not None:
                assert gc.adapter.layout_tokens(grid) == layout(grid), grid
            if gc.adapter.layout_tokens(grid) + 1 > max_tokens:
                with pytest.raises(ValueError, match="too small"):
                    family.inputs(processor, [image], **options)
                continue
            inputs = family.inputs(processor, [image], **options)
            with torch.no_grad():
                model(**inputs)
            plan = gc.plans[0]
            span = int(inputs["attention_mask"].sum()) - bare
            count = int((inputs["input_ids"] == token).sum())
            assert count == plan.num_tokens == gc.adapter.num_image_tokens(*size, **options), size
            assert span <= max_tokens, (size, span)
            if slack is not None:
                assert plan.num_tokens == plan.num_tokens_full or span >= max_tokens - slack, (size, span)


def check_generate_with_labels(
    family: TilingFamily,
    model: Any,
    processor: Any,
    mode: str,
    sizes: Sequence[tuple[int, int]] = ((100, 190), (64, 64)),
) -> None:
    """``generate`` and a forward with labels run on a left-padded batch (by default a split and a one-tile image)."""
    from tests.conftest import random_image

    images = [random_image(*size, seed=k + 1) for k, size in enumerate(sizes)]
    prompt = family.prompt
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode):
        inputs = family.inputs(processor, images, prompts=[prompt, "A longer prompt first. " + prompt])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert out.shape[0] == 2 and torch.isfinite(loss)
