"""GlobalCom² on a real (tiny, random) Gemma3ForConditionalGeneration, pan-and-scan off and on.

The family-generic checks (apply/remove bit-exact, batches, threads, tie rule, error classes) run on it in
test_families.py; here: the counts, the kept sets and the exact sequence (markers, runs, token types) against a
plain re-implementation of docs/families.md's Gemma 3 section, and the model end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.adapters import idefics3 as idefics3_module
from globalcom2.demo.tiny_tiling import GEMMA3_PAN_AND_SCAN
from tests.adapters.plain_families import capture_llm_inputs, forward_and_capture, plain_cosine
from tests.adapters.tiling_checks import (
    TilingFamily,
    check_budget_counts,
    check_generate_with_labels,
    check_llm_reads,
    check_max_image_tokens,
    replay_tiling_plans,
)
from tests.conftest import random_image, sweep

# (height, width) at the tiny scale (64 px tiles, crops >= 32 px): landscape 1 x 2..4, portrait 2..4 x 1, square
# and mildly long images (no crops), and images whose crops would be too small (no crops)
SIZES = [
    (60, 190), (190, 60), (150, 150), (200, 90), (70, 100), (40, 200), (300, 70), (64, 64), (100, 260),
    (45, 50), (20, 300), (129, 64),
]  # fmt: skip
PROMPT = "USER: <start_of_image>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


@pytest.fixture(scope="module")
def gemma_dir(checkpoint):
    from globalcom2.demo.tiny_tiling import build_tiny_gemma3

    return checkpoint(build_tiny_gemma3)  # the family table's checkpoint, built once per session


@pytest.fixture()
def fam(gemma_dir):
    from globalcom2.loading import load_tiny_family

    return load_tiny_family(gemma_dir)


def _inputs(processor, images, prompts=None, **options):
    """The processor on one image per prompt, with ``options`` (default: the tiny pan-and-scan, on)."""
    prompts = prompts or [PROMPT] * len(images)
    nested = [[image] for image in images]
    return processor(
        images=nested, text=prompts, return_tensors="pt", padding=True, **(options or GEMMA3_PAN_AND_SCAN)
    )


def _pas(on: bool) -> dict:
    return GEMMA3_PAN_AND_SCAN if on else {"do_pan_and_scan": False}


def _family(model) -> TilingFamily:
    """Gemma 3's geometry: Eq. 7 on the projector's input (the tower's patches), summed per k x k pooling group;
    the original image is tile 0."""
    vc = model.config.vision_config
    g = int(round(model.config.mm_tokens_per_image**0.5))

    def plain_scores(model, inputs):
        return plain_cosine(model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state)

    return TilingFamily(
        _inputs, PROMPT, "<start_of_image>", g, vc.image_size // vc.patch_size // g,
        (idefics3_module, "cosine_scores"), idefics3_module, plain_scores, _capture_llm_inputs,
        thumbnail_first=True,
    )  # fmt: skip


def plain_crop_count(height, width, min_crop=32, max_crops=4, min_ratio=1.2) -> int:
    """Pan-and-scan's crop count as its docs state it: along the long side, round(long / short) crops clamped to
    [2, max_crops] and to long // min_crop, none below min_ratio or when a crop is narrower than min_crop."""
    long, short = max(height, width), min(height, width)
    if long / short < min_ratio:
        return 0
    n = min(int(np.floor(long / short + 0.5)), long // min_crop)
    n = min(max(2, n), max_crops)
    size_long, size_short = -(-long // n), short
    return 0 if min(size_long, size_short) < min_crop else n


def plain_gemma3_image_text(crop_counts, thumb_count) -> str:
    """One image's expansion in a Gemma 3 prompt with the given run lengths (HF's documented layout)."""

    def run(k):
        return f"\n\n<start_of_image>{'<image_soft_token>' * int(k)}<end_of_image>\n\n"

    if not len(crop_counts):
        return run(thumb_count)
    return (
        f"Here is the original image {run(thumb_count)} and here are some crops to help you see better "
        + " ".join(run(k) for k in crop_counts)
    )


def plain_gemma3_sequence(t_order, keep, grid, g):
    """Rows of an image's features in LLM order: the original image's kept tokens, then each crop's (raster)."""
    rows, cols = grid
    seq = [int(i) for i in t_order]
    for j in range(rows * cols):
        cr, cc = divmod(j, cols)
        seq += [
            (j + 1) * g * g + y * g + x for y in range(g) for x in range(g) if keep[cr * g + y, cc * g + x]
        ]
    return seq


# -- the counts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", sweep([0.5, 0.25, 0.1], [0.25]))
def test_processor_count_equals_features_for_many_sizes(fam, ratio):
    """Budget mode, pan-and-scan on and off: the processor's placeholder count == the features == the serving
    count == int(N*R) + int(R*n*N) for n pan-and-scan crops (plain crop rule; none: int(N*R)); the prompt shrinks
    by exactly the tokens saved; the token type ids mark exactly the placeholders."""
    model, processor = fam
    family = _family(model)
    n = family.n
    for pas in (True, False):
        counts = check_budget_counts(family, model, processor, SIZES, ratio, **_pas(pas))
        with globalcom2.apply(model, processor, ratio=ratio):
            inputs = _inputs(processor, [random_image(*s, seed=k) for k, s in enumerate(SIZES)], **_pas(pas))
            served = processor._get_num_multimodal_tokens(image_sizes=SIZES, **_pas(pas)).num_image_tokens
        assert torch.equal(
            inputs["token_type_ids"].bool(), inputs["input_ids"] == model.config.image_token_id
        )
        for k, size in enumerate(SIZES):
            crops = plain_crop_count(*size) if pas else 0
            expected = int(n * ratio) + int(ratio * crops * n)
            plan = counts.plans[k]
            assert counts.counted[k] == expected == served[k], (size, pas)
            assert plan.num_tokens_full == (crops + 1) * n and plan.num_crops == crops
            if crops:
                assert plan.grid == ((1, crops) if size[1] >= size[0] else (crops, 1))


def test_pooling_groups_are_the_projectors(fam):
    """The pooled token's score sums exactly the k x k patches the projector's average pooling folds into it."""
    from globalcom2.adapters.internvl import merge_pool

    model, _ = fam
    family = _family(model)
    g, k = family.g, family.shuffle
    p = g * k
    proj = model.model.multi_modal_projector
    eye = torch.eye(p * p, dtype=torch.float32).reshape(1, p * p, p * p)  # patch i's feature = e_i
    pooled = proj.avg_pool(eye.transpose(1, 2).reshape(1, p * p, p, p)).flatten(2)[0]  # (patch, token)
    assert torch.equal(pooled > 0, merge_pool(torch.eye(p * p), k) > 0)


# -- scores, kept set and the LLM's sequence against the plain re-implementation ----------------------------------
def _capture_llm_inputs(model):
    return capture_llm_inputs(
        model.model, model.model.language_model, ("input_ids", "attention_mask", "token_type_ids")
    )


@pytest.mark.parametrize("allocation", sweep(ALLOCATIONS, ["softmax-sum", "uniform"]))
@pytest.mark.parametrize(
    "case", sweep([("reference", 0.25), ("budget", 0.1), ("budget", 0.5)], [("budget", 0.1)])
)
def test_kept_tokens_and_sequence_match_plain(fam, monkeypatch, case, allocation):
    """Eq. 7 on the projector's input (the 16 x 16 patches here), summed per pooling group, the kept sets, per-crop
    counts, the prompt the LLM reads (sentences, markers, runs), its token types and the features at every
    placeholder equal a plain re-implementation, pan-and-scan on (1 x n, n x 1) and off, for every allocation and
    scoring. The selection is replayed from the pooled scores the library used (checked against plain first)."""
    model, processor = fam
    mode, ratio = case
    family = _family(model)
    token = model.config.image_token_id
    sizes = [(60, 190), (190, 60), (40, 200), (150, 150)]

    def pas(k):  # the last image without pan-and-scan (with the uniform allocation: with it)
        return k < len(sizes) - 1 or allocation == "uniform"

    runs = replay_tiling_plans(
        family, model, processor, monkeypatch, mode=mode, ratio=ratio, allocation=allocation, sizes=sizes,
        options=lambda k: _pas(pas(k)), label=lambda k: f"{sizes[k]} pas={pas(k)}",
    )  # fmt: skip
    for run in runs:
        rows = (
            run.order if run.keep is None else plain_gemma3_sequence(run.order, run.keep, run.grid, family.g)
        )
        text = PROMPT.replace("<start_of_image>", plain_gemma3_image_text(run.crop_counts, run.thumb_count))
        check_llm_reads(run, processor, token, text, rows)
        valid = run.seen["attention_mask"][0].bool()
        types = run.seen["token_type_ids"][0][valid].bool()
        assert torch.equal(types, run.seen["input_ids"][0][valid] == token), run.where


# -- the model end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_with_labels_and_bidirectional_image_blocks(fam, mode):
    """generate and a forward with labels run; the attention mask the LLM gets lets every kept token of a run see
    every other one (bidirectional inside an image run, one block per run), and no more."""
    model, processor = fam
    check_generate_with_labels(_family(model), model, processor, mode, sizes=[(60, 190), (150, 150)])
    images = [random_image(60, 190, seed=1), random_image(150, 150, seed=2)]
    # The mask the LLM used: rebuilt from what the model received.
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    with globalcom2.apply(model, processor, ratio=0.25, mode=mode):
        seen = forward_and_capture(model, _inputs(processor, images), _capture_llm_inputs(model))
    blocks = get_block_sequence_ids_for_mask(seen["token_type_ids"])
    is_img = seen["input_ids"] == model.config.image_token_id
    assert torch.equal(blocks >= 0, is_img)
    # one block per run: a block's tokens are contiguous and framed by <start_of_image> ... <end_of_image>
    boi, eoi = model.config.boi_token_id, model.config.eoi_token_id
    for b in range(blocks.shape[0]):
        for block in blocks[b].unique():
            if block < 0:
                continue
            where = (blocks[b] == block).nonzero().reshape(-1)
            assert int(where[-1] - where[0]) + 1 == where.numel()
            assert (
                int(seen["input_ids"][b, where[0] - 1]) == boi
                and int(seen["input_ids"][b, where[-1] + 1]) == eoi
            )


@pytest.mark.parametrize("max_tokens", sweep([20, 85, 100, 140], [20, 100]))
def test_max_image_tokens_counts_the_layout(fam, max_tokens):
    """Each image's prompt span (sentences, markers, runs as the prompt tokenises them) is at most T, and the
    processor's count == the features; an image whose layout alone exceeds T is refused with the minimum T."""
    model, processor = fam
    check_max_image_tokens(
        _family(model), model, processor, SIZES[:8], max_tokens, slack=2, **GEMMA3_PAN_AND_SCAN
    )


def test_single_crop_pan_and_scan_is_refused(fam):
    model, processor = fam
    with globalcom2.apply(model, processor, ratio=0.25):
        with pytest.raises(NotImplementedError, match="single crop"):
            processor(
                images=[[random_image(60, 190)]], text=[PROMPT], return_tensors="pt",
                **{**GEMMA3_PAN_AND_SCAN, "pan_and_scan_max_num_crops": 1},
            )  # fmt: skip
