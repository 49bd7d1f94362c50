"""GlobalCom² on a real (tiny, random) Llama4ForConditionalGeneration.

The family-generic checks (apply/remove bit-exact, batches, threads, tie rule, error classes) run on it in
test_families.py; here: the tile grid against the stock image processor's own canvas code, the pixel layout of the
PIL stand-in, the counts, and the kept sets, per-crop counts and the exact sequence (separators, runs, rows) against
plain re-implementations of docs/families.md's Llama 4 section; PruMerge(+) against the plain rule of
docs/prumerge.md's Llama 4 section.

**Image processor.** transformers' ``Llama4ImageProcessor`` is torchvision-only and torchvision is not installed
beside this CPU torch. The canvas choice is pure torch in that module (``find_supported_resolutions``,
``get_best_fit``, ``get_max_res_without_distortion``): :func:`_stock_canvas_functions` reads those three functions
from the installed module's source and runs them (no import of the module, nothing patched), so the grid and the
resized size are checked against the library's own code. The resize, pad and tile cut are torchvision calls; the
stand-in (``globalcom2.processors.Llama4ImageProcessorPil``) does them with PIL/NumPy and the pixel layout is
checked against a plain construction here. The model-side tests run from those pixel values.
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict
from functools import lru_cache

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.adapters import family as family_module
from globalcom2.adapters import internvl as internvl_module
from globalcom2.adapters.internvl import GRID_KEY
from globalcom2.adapters.llama4 import llama4_canvas
from globalcom2.methods import apply_method
from tests.adapters.families import TILING_SIZES, tiny_checkpoint_fixtures, visualize_standin_plan
from tests.adapters.plain_families import (
    capture_llm_inputs,
    forward_and_capture,
    plain_internvl_sequence,
    plain_llama4_cls_logits,
    plain_llama4_image_text,
    plain_llama4_qk,
    spy,
)
from tests.adapters.tiling_checks import (
    TilingFamily,
    check_budget_counts,
    check_generate_with_labels,
    check_max_image_tokens,
    replay_tiling_plans,
)
from tests.conftest import random_image, sweep
from tests.methods.plain_prumerge import plain_shuffled_tiles

# (height, width): up to 6 tiles of 64 px plus the global tile; small or square images are one tile
SIZES = list(TILING_SIZES)
PROMPT = "USER: <|image|>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")


tiny_dir, fam = tiny_checkpoint_fixtures("globalcom2.demo.tiny_tiling:build_tiny_llama4")


def _inputs(processor, images, prompts=None, **kwargs):
    prompts = prompts or [PROMPT] * len(images)
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, **kwargs)


def _family(model) -> TilingFamily:
    """Llama 4's geometry: Eq. 1 with the class embedding last (rotated q/k), s x s pixel shuffle; the model has
    no inner model, so the LLM's own inputs are the record."""
    vc = model.config.vision_config
    s = int(round(1 / vc.pixel_shuffle_ratio))

    def plain_scores(model, inputs):
        tower = model.vision_model
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        layer = tower.model.layers[-1]
        freqs = tower.rotary_embedding.freqs_ci
        return plain_llama4_cls_logits(hidden, layer, freqs, layer.self_attn.num_heads).numpy()

    def capture(model):
        return capture_llm_inputs(model.language_model, model.language_model, keys=("attention_mask",))

    return TilingFamily(
        _inputs, PROMPT, "<|image|>", vc.image_size // vc.patch_size // s, s, (family_module, "cls_scores_from_qk"),
        internvl_module, plain_scores, capture, owner=lambda model: model, output="last_hidden_state",
        score_tolerance={"rtol": 1e-4, "atol": 1e-5},
    )  # fmt: skip


def _stock_canvas_functions() -> dict:
    """``find_supported_resolutions``, ``get_best_fit`` and ``get_max_res_without_distortion`` of the installed
    ``transformers.models.llama4.image_processing_llama4``, compiled from its source file (the module itself
    imports torchvision at the top and cannot be imported here)."""
    import transformers

    path = transformers.__file__.replace("__init__.py", "models/llama4/image_processing_llama4.py")
    tree = ast.parse(open(path).read())
    wanted = ("get_factors", "find_supported_resolutions", "get_best_fit", "get_max_res_without_distortion")
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert len(body) == len(wanted), "the stock module's canvas functions moved"
    for node in body:  # the stock lru_cache is keyed by a SizeDict; a fresh one per compile is fine
        node.decorator_list = [d for d in node.decorator_list if ast.unparse(d) != "lru_cache(maxsize=1)"]
    namespace = {"torch": torch, "math": math, "defaultdict": defaultdict, "lru_cache": lru_cache}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace


def _stock_canvas(fns, height, width, tile, max_patches, resize_to_max_canvas=False):
    """The stock processor's ``_preprocess`` canvas steps, with its own functions (see its source)."""
    from transformers.image_utils import SizeDict

    resolutions = torch.tensor(
        fns["find_supported_resolutions"](max_patches, SizeDict(height=tile, width=tile))
    )
    target = fns["get_best_fit"]((height, width), resolutions, resize_to_max_canvas=resize_to_max_canvas)
    target = (int(target[0]), int(target[1]))
    capped = target
    if not resize_to_max_canvas:
        capped = (min(max(height, tile), target[0]), min(max(width, tile), target[1]))
    new = fns["get_max_res_without_distortion"]((height, width), capped)
    return target[0] // tile, target[1] // tile, max(new[0], 1), max(new[1], 1)


@pytest.mark.parametrize("max_patches", sweep([16, 6, 4, 1], [16, 6]))
def test_canvas_rule_equals_the_stock_image_processor(max_patches):
    """:func:`llama4_canvas` (grid and resized size) equals the stock processor's own canvas code for 60 sizes from
    tiny to 20:1, at Llama-4-Scout's 336 px tiles and the tiny model's 64 px, with and without resize_to_max_canvas."""
    fns = _stock_canvas_functions()
    rng = np.random.default_rng(max_patches)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 3000, (50, 2))] + [
        (336, 336), (337, 336), (100, 2000), (2000, 100), (672, 336), (1, 1), (335, 673), (64, 64), (65, 129),
        (1008, 1344),
    ]  # fmt: skip
    for tile in (336, 64):
        for resize_to_max in (False, True):
            for h, w in sizes:
                got = llama4_canvas(h, w, tile, max_patches, resize_to_max)
                assert got == _stock_canvas(fns, h, w, tile, max_patches, resize_to_max), (h, w, tile)


def test_pil_stand_in_lays_out_pixels_as_the_stock_processor(fam):
    """The stand-in's pixel values are the stock layout written out plainly: the image resized (PIL bilinear) to
    the canvas size without distortion, top-left, zero-padded, rescaled and normalised, cut into tiles row-major,
    then the whole image squashed to one tile last (more than one tile only); ``aspect_ratios`` the grid."""
    from PIL import Image

    _, processor = fam
    ip = processor.image_processor
    tile = int(ip.size["height"])
    fns = _stock_canvas_functions()
    images = [random_image(*hw, seed=k) for k, hw in enumerate(SIZES[:6])]
    out = ip(images, return_tensors="np")
    at = 0
    for image, ratio in zip(images, out["aspect_ratios"], strict=True):
        rows, cols, nh, nw = _stock_canvas(fns, image.height, image.width, tile, int(ip.max_patches))
        assert ratio.tolist() == [rows, cols]
        canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.float64)
        canvas[:nh, :nw] = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float64)
        canvas = (canvas / 255 - 0.5) / 0.5
        expected = [canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows)
                    for c in range(cols)]  # fmt: skip
        if rows * cols > 1:
            squashed = np.asarray(image.resize((tile, tile), Image.Resampling.BILINEAR), dtype=np.float64)
            expected.append((squashed / 255 - 0.5) / 0.5)
        for tile_pixels in expected:
            np.testing.assert_allclose(out["pixel_values"][at], tile_pixels.transpose(2, 0, 1), atol=1e-5)
            at += 1
    assert at == out["pixel_values"].shape[0]


@pytest.mark.parametrize("ratio", sweep([0.5, 0.25, 0.1], [0.25]))
def test_processor_count_equals_features_for_many_sizes(fam, ratio):
    """Budget mode: ``<|patch|>`` count == features == int(N*R) + int(R*n*N) for n tiles besides the global one
    (a lone tile: int(N*R)); the prompt shrinks by exactly the tokens saved; the separators stay."""
    model, processor = fam
    n = _family(model).n
    images = [random_image(*s) for s in SIZES]
    grids = [tuple(int(v) for v in a) for a in processor.image_processor(images)["aspect_ratios"]]
    counts = check_budget_counts(_family(model), model, processor, SIZES, ratio)
    for k, size in enumerate(SIZES):
        crops = grids[k][0] * grids[k][1] if grids[k] != (1, 1) else 0
        expected = int(n * ratio) + int(ratio * crops * n)
        assert counts.counted[k] == expected and counts.plans[k].num_tokens_full == (crops + 1) * n, size


def test_max_patches_call_option_reaches_the_count(fam):
    """A call's ``max_patches`` changes the grid; the budget count follows it (the processor's own merge)."""
    model, processor = fam
    token = model.config.image_token_id
    image = random_image(100, 190, seed=3)
    with globalcom2.apply(model, processor, ratio=0.25) as gc:
        for max_patches in (2, 6):
            inputs = _inputs(processor, [image], max_patches=max_patches)
            assert inputs[GRID_KEY][0].tolist() == list(
                gc.adapter.grid_for_image(100, 190, max_patches=max_patches)
            )
            assert int((inputs["input_ids"] == token).sum()) == gc.adapter.num_image_tokens(
                100, 190, max_patches=max_patches
            )


@pytest.mark.parametrize("allocation", sweep(ALLOCATIONS, ["softmax-sum", "topk-count"]))
@pytest.mark.parametrize(
    "case", sweep([("reference", 0.25), ("budget", 0.1), ("budget", 0.5)], [("budget", 0.1)])
)
def test_kept_tokens_and_sequence_match_plain(fam, monkeypatch, case, allocation):
    """Eq. 1 with the class embedding last (rotated q/k), summed per pixel-shuffle group, the kept sets, per-tile
    counts, the prompt the LLM reads (separators, runs) and the features at every placeholder equal plain
    re-implementations on 2 x 3, 3 x 2, 1 x 4 and lone-tile images, for every scoring."""
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
        text = PROMPT.replace(
            "<|image|>", plain_llama4_image_text(run.grid, run.crop_counts, run.thumb_count)
        )
        ids = torch.tensor(processor.tokenizer(text)["input_ids"])
        embeds = run.seen["inputs_embeds"][0][run.seen["attention_mask"][0].bool()]
        assert embeds.shape[0] == ids.numel(), run.where  # the prompt the LLM reads, row for row
        is_patch = ids == token
        with torch.no_grad():
            text_rows = model.get_input_embeddings()(ids[~is_patch])
            expected = model.multi_modal_projector(run.features[seq])
        assert torch.equal(embeds[~is_patch], text_rows.to(embeds.dtype)), run.where  # separators in place
        torch.testing.assert_close(embeds[is_patch], expected.to(embeds.dtype), msg=run.where)


def test_tower_rotary_tap_equals_eager_attention(fam, monkeypatch):
    """The [CLS] row the hooks compute (``score="softmax"``) equals the head-mean softmax row of the last position
    in the layer's own eager attention, so the rotation and the [CLS] position are the layer's."""
    model, processor = fam
    tower = model.vision_model
    layer = tower.model.layers[-1]
    captured = {}

    def record(module, args, output) -> None:
        captured.setdefault("w", output[1])

    hook = layer.self_attn.register_forward_hook(record)
    tower.set_attn_implementation("eager")
    used = spy(monkeypatch, family_module, "cls_scores_from_qk")
    try:
        with globalcom2.apply(model, processor, ratio=0.25, score="softmax") as gc, torch.no_grad():
            inputs = _inputs(processor, [random_image(100, 190, seed=4)])
            model.get_image_features(inputs["pixel_values"], **{GRID_KEY: inputs[GRID_KEY]})
            assert gc.plans
    finally:
        hook.remove()
    eager = captured["w"][:, :, -1, :-1].mean(1)  # head-mean softmax row of [CLS] over the patch keys
    torch.testing.assert_close(used[0], eager.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_with_labels_and_left_padding(fam, mode):
    model, processor = fam
    check_generate_with_labels(_family(model), model, processor, mode)


@pytest.mark.parametrize("max_tokens", sweep([20, 45, 80], [45]))
def test_max_image_tokens_counts_the_span(fam, max_tokens):
    """Each image's span (``<|image_start|>`` ... ``<|image_end|>``, separators and runs) is at most T and
    ``3 + rows * cols`` markers for a split image; count == features; too small is refused."""
    model, processor = fam

    def layout(grid):
        return 3 + grid[0] * grid[1] if grid != (1, 1) else 3

    check_max_image_tokens(_family(model), model, processor, SIZES[:8], max_tokens, layout=layout)


@pytest.mark.slow
def test_cli_visualize_llama4_geometry(tmp_path):
    """`visualize --model standin --family llama4` (random vision weights at Llama-4-Scout's geometry) on the rocket
    photo (640x427): a 2 x 2 canvas of 336 px tiles + the global tile, 144 tokens each, the budget count at R = 0.25."""
    plan = visualize_standin_plan("llama4", tmp_path / "kept.png")
    assert plan["grid"] == [2, 2] and plan["num_tokens_full"] == 5 * 144
    assert plan["num_tokens"] == int(144 * 0.25) + int(0.25 * 4 * 144)
    assert llama4_canvas(427, 640, 336, 16) == (
        2,
        2,
        427,
        640,
    )  # the photo is not upscaled: padding below, right


@torch.no_grad()
def _plain_prumerge_tower(model, inputs):
    """float64 [CLS] attention ("full": one attention over the whole width, the layer's rotated q and k) of every
    patch, the patch keys and the pixel-shuffled features ``vision_adapter``'s MLP receives, per tile."""
    tower = model.vision_model
    layer = tower.model.layers[-1]
    captured = {}

    def layer_input(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_state"]).detach())

    def mlp_input(module, args):
        captured.setdefault("y", args[0].detach())

    hooks = [layer.register_forward_pre_hook(layer_input, with_kwargs=True),
             tower.vision_adapter.mlp.register_forward_pre_hook(mlp_input)]  # fmt: skip
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    q, k = plain_llama4_qk(captured["h"], layer, tower.rotary_embedding.freqs_ci, layer.self_attn.num_heads)
    a = torch.softmax(torch.einsum("td,tsd->ts", q[:, -1], k) / math.sqrt(q.shape[-1]), dim=-1)
    return a[:, :-1], k[:, :-1], captured["y"].double()  # [CLS] last: the patches are the first P columns


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_prumerge_equals_the_plain_rule(fam, method):
    """Per tile (crops row-major, the global tile last): the [CLS] attention summed over each 2 x 2 pixel-shuffle
    group, IQR outliers, PruMerge+'s samples, the merge by the cosine of the groups' keys side by side on the MLP's
    input; each tile's run (between its separators) holds its kept rows in raster order, then its remainder."""
    model, processor = fam
    with torch.no_grad():  # a sharper [CLS] attention: tiles with several outliers (the tiny tower's is flat)
        model.vision_model.model.layers[-1].self_attn.q_proj.weight.mul_(120.0)
    plus = method == "prumerge+"
    image = random_image(100, 190, seed=0)
    attention, keys, y = _plain_prumerge_tower(model, _inputs(processor, [image]))
    tiles = plain_shuffled_tiles(attention, keys, y, 2, plus)
    expected = [row for _, _, rows in tiles for row in rows]
    runs, outliers = [len(rows) for _, _, rows in tiles], [num_out for _, num_out, _ in tiles]
    with apply_method(model, processor, method) as handle:
        inputs = _inputs(processor, [image])
        seen = forward_and_capture(model, inputs, _family(model).capture(model))
        plan = handle.plans[0]
    grid = plan.grid
    assert plan.outlier_counts.tolist() == [outliers[-1], *outliers[:-1]]  # the record: thumbnail first
    # the rule was exercised beyond the one-token fallback (16 tokens a tile here: few IQR outliers)
    assert max(outliers) >= 2 and not bool(plan.fallback_tiles.all())
    text = PROMPT.replace("<|image|>", plain_llama4_image_text(grid, runs[:-1], runs[-1]))
    ids = torch.tensor(processor.tokenizer(text)["input_ids"])
    embeds = seen["inputs_embeds"][0]
    assert embeds.shape[0] == ids.numel()  # the prompt the LLM reads: separators, then each tile's run
    is_patch = ids == int(model.config.image_token_id)
    with torch.no_grad():
        text_rows = model.get_input_embeddings()(ids[~is_patch])
        mlp = model.vision_model.vision_adapter.mlp
        rows = model.multi_modal_projector(mlp(torch.stack(expected).float()))
    assert plan.num_tokens == len(expected) == int(is_patch.sum())
    assert torch.equal(embeds[~is_patch], text_rows.to(embeds.dtype))
    torch.testing.assert_close(embeds[is_patch], rows.to(embeds.dtype), atol=1e-5, rtol=1e-4)
