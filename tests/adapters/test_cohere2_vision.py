"""GlobalCom² on a real (tiny, random) Cohere2VisionForConditionalGeneration.

The family-generic checks run on it in test_families.py (``--full``); here: the tile grid against the stock image
processor's own grid code, the counts, and the kept sets, per-crop counts and the exact sequence (line breaks, runs,
rows) against plain re-implementations of docs/families.md's Cohere2 Vision section.

**Image processor.** transformers' ``Cohere2VisionImageProcessor`` is torchvision-only; its grid choice
(``get_all_supported_aspect_ratios``, ``get_optimal_tiled_canvas``) is NumPy, so :func:`_stock_grid_functions`
compiles those two functions from the installed module's source (no import of the module, nothing patched) and
the grid rule is checked against them. The stand-in (``globalcom2.processors.Cohere2VisionImageProcessorPil``) does
the resizing with PIL; the model-side tests run from its pixel values.
"""

from __future__ import annotations

import ast
import functools

import numpy as np
import pytest

import globalcom2
from globalcom2.adapters import idefics3 as idefics3_module
from globalcom2.adapters.cohere2_vision import cohere2_tile_grid
from tests.adapters.families import TILING_SIZES, tiny_checkpoint_fixtures, visualize_standin_plan
from tests.adapters.plain_families import (
    capture_llm_inputs,
    plain_cohere2_image_text,
    plain_cosine,
    plain_internvl_sequence,
)
from tests.adapters.tiling_checks import (
    TilingFamily,
    check_budget_counts,
    check_llm_reads,
    check_max_image_tokens,
    replay_tiling_plans,
)
from tests.conftest import random_image, sweep

SIZES = list(TILING_SIZES)
PROMPT = "USER: <|IMG_PATCH|>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


tiny_dir, fam = tiny_checkpoint_fixtures("globalcom2.demo.tiny_tiling:build_tiny_cohere2_vision")


def _inputs(processor, images, prompts=None):
    prompts = prompts or [PROMPT] * len(images)
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _stock_grid_functions() -> dict:
    """``get_all_supported_aspect_ratios`` and ``get_optimal_tiled_canvas`` of the installed
    ``transformers.models.cohere2_vision.image_processing_cohere2_vision``, compiled from its source (the module
    imports torchvision at the top)."""
    import transformers

    path = transformers.__file__.replace(
        "__init__.py", "models/cohere2_vision/image_processing_cohere2_vision.py"
    )
    tree = ast.parse(open(path).read())
    wanted = ("get_all_supported_aspect_ratios", "get_optimal_tiled_canvas")
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert len(body) == len(wanted), "the stock module's grid functions moved"
    namespace: dict = {"np": np, "lru_cache": functools.lru_cache}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("max_patches", sweep([12, 6, 2], [12]))
def test_grid_rule_equals_the_stock_image_processor(max_patches):
    """:func:`cohere2_tile_grid` equals the stock processor's own grid code for 60 sizes, at Command-A-Vision's
    512 px tiles and the tiny model's 64 px."""
    fns = _stock_grid_functions()
    rng = np.random.default_rng(max_patches)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 3000, (54, 2))]
    sizes += [(512, 512), (513, 512), (100, 2000), (2000, 100), (1024, 512), (1, 1)]
    for tile in (512, 64):
        for h, w in sizes:
            cols, rows = fns["get_optimal_tiled_canvas"]((h, w), (tile, tile), 1, max_patches)
            assert cohere2_tile_grid(h, w, (tile, tile), 1, max_patches) == (rows, cols), (h, w, tile)


def _family(model) -> TilingFamily:
    """Cohere2's geometry: Eq. 7 on the projector's input (the tower's last_hidden_state), 2 x 2 pixel shuffle."""
    vc = model.config.vision_config
    s = int(model.config.downsample_factor)

    def plain_scores(model, inputs):
        return plain_cosine(model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state)

    return TilingFamily(
        _inputs, PROMPT, "<|IMG_PATCH|>", vc.image_size // vc.patch_size // s, s,
        (idefics3_module, "cosine_scores"), idefics3_module, plain_scores,
        lambda model: capture_llm_inputs(model.model, model.model.language_model),
    )  # fmt: skip


@pytest.mark.parametrize("ratio", sweep([0.5, 0.25, 0.1], [0.25]))
def test_processor_count_equals_features_for_many_sizes(fam, ratio):
    """Budget mode: placeholder count == features == int(N*R) + int(R*n*N) (one tile: int(N*R)); the prompt shrinks
    by exactly the tokens saved; the serving count is the span (markers + runs)."""
    model, processor = fam
    family = _family(model)
    n = family.n
    tiles_of = [int(t) for t in processor.image_processor([random_image(*s) for s in SIZES])["num_patches"]]
    counts = check_budget_counts(family, model, processor, SIZES, ratio)
    with globalcom2.apply(model, processor, ratio=ratio):
        served = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    for k, size in enumerate(SIZES):
        expected = int(n * ratio) + int(ratio * (tiles_of[k] - 1) * n)
        assert counts.counted[k] == expected and counts.plans[k].num_tokens_full == tiles_of[k] * n, size
        assert served[k] == 2 + tiles_of[k] + expected, (
            size
        )  # <|START_OF_IMG|>, a line break per tile, <|END_..|>


@pytest.mark.parametrize("allocation", sweep(ALLOCATIONS, ["softmax-sum"]))
@pytest.mark.parametrize(
    "case", sweep([("reference", 0.25), ("budget", 0.1), ("budget", 0.5)], [("budget", 0.1)])
)
def test_kept_tokens_and_sequence_match_plain(fam, monkeypatch, case, allocation):
    """Eq. 7 on the projector's input (the tower's last_hidden_state), summed per 2x2 group, the kept sets,
    per-crop counts, the prompt the LLM reads (line breaks, runs) and the features at every placeholder equal a
    plain re-implementation on 2 x 3, 3 x 2, 1 x 4 and single-tile images, for every scoring."""
    model, processor = fam
    mode, ratio = case
    family = _family(model)
    token = model.config.image_token_id
    runs = replay_tiling_plans(
        family, model, processor, monkeypatch, mode=mode, ratio=ratio, allocation=allocation
    )
    for run in runs:
        seq = (
            run.order
            if run.keep is None
            else plain_internvl_sequence(run.order, run.keep, run.grid, family.g)
        )
        text = PROMPT.replace("<|IMG_PATCH|>", plain_cohere2_image_text(run.crop_counts, run.thumb_count))
        check_llm_reads(run, processor, token, text, seq)


@pytest.mark.parametrize("max_tokens", sweep([20, 45, 80], [45]))
def test_max_image_tokens_counts_the_span(fam, max_tokens):
    """Each image's span (markers, line breaks and runs) is at most T; count == features; too small is refused."""
    model, processor = fam

    def layout(grid):  # <|START_OF_IMG|>, a line break per tile, <|END_OF_IMG|>
        return 2 + (grid[0] * grid[1] + 1 if grid != (1, 1) else 1)

    check_max_image_tokens(_family(model), model, processor, SIZES[:8], max_tokens, layout=layout)


@pytest.mark.slow
def test_cli_visualize_cohere2_vision_standin(tmp_path):
    """`visualize --model standin --family cohere2_vision`: the DINOv2 stand-in as SigLIP at 448 px in a stock
    Cohere2VisionForConditionalGeneration, the rocket photo (640x427): 1 x 2 crops + the thumbnail, 256 tokens each."""
    plan = visualize_standin_plan("cohere2_vision", tmp_path / "kept.png")
    assert plan["grid"] == [1, 2] and plan["num_tokens_full"] == 3 * 256
    assert plan["num_tokens"] == int(256 * 0.25) + int(0.25 * 2 * 256)
