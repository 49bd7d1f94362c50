"""``max_image_tokens=T``: a per-image token budget instead of a ratio, on every family (tiny real checkpoints).

For many image sizes and budgets: the patched processor's count (the prompt's placeholder run, markers included),
its serving count (``_get_num_multimodal_tokens``, what vLLM reads) and the features the model produces agree, are
at most T, equal the uncompressed count when that fits, and otherwise use the largest R that fits. Generation works
on mixed-size batches; an image under T gives exactly the uncompressed model's logits; the exactly-one-of rule holds
in the config, ``apply``, ``apply_method`` and the CLI.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import globalcom2
from globalcom2 import GlobalComConfig
from globalcom2.adapters.idefics3 import idefics3_layout_tokens
from globalcom2.adapters.internvl import IMAGE_MARKERS, InternVLAdapter, num_tiles
from globalcom2.core.budget import budget_counts
from globalcom2.methods import apply_method
from globalcom2.methods.vision import pooling_counts
from tests.adapters.families import FAMILIES, family_fixtures, greedy, inputs_for, load
from tests.conftest import random_image
from tests.test_cli import run_cli

IDEFICS3 = ("idefics3", "smolvlm")
SUPPORTED = [f for f in FAMILIES if f.name in ("llava_next", "llava_onevision", "internvl", *IDEFICS3)]
# Wide, tall, square, tiny and large images: 1 to many crops, padded and unpadded, down-sampled (OneVision).
SIZES = ((30, 40), (61, 183), (100, 180), (180, 100), (150, 150), (233, 90), (90, 260), (300, 300),
         (400, 130))  # fmt: skip


family_dir, fam = family_fixtures(SUPPORTED)


def _prompt_count(family, model, processor, image) -> int:
    """Tokens the image occupies in the processor's prompt: its placeholders (plus InternVL's <img></img>; for
    Idefics3 the whole span from its first ``<fake_token_around_image>`` to its last: markers, newlines, runs)."""
    ids = inputs_for(family, processor, [image])["input_ids"][0]
    count = int((ids == model.config.image_token_id).sum())
    if family.name in IDEFICS3:
        fake = (ids == processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")).nonzero()
        span = ids[int(fake[0]) : int(fake[-1]) + 1]
        assert int((span == model.config.image_token_id).sum()) == count  # every placeholder inside the span
        return int(span.numel())
    if family.name == "internvl":
        tok = processor.tokenizer
        for marker in (processor.start_image_token, processor.end_image_token):
            assert int((ids == tok.convert_tokens_to_ids(marker)).sum()) == 1
        count += IMAGE_MARKERS
    return count


def _count_at(adapter, size: tuple[int, int], ratio: float) -> int:
    """The image's budget-mode count at ``ratio`` (layout tokens included), from its geometry."""
    if isinstance(adapter, InternVLAdapter):  # and Idefics3 / SmolVLM
        grid = adapter.grid_for_image(*size)
        tiles, n = num_tiles(*grid), adapter.g**2
        return adapter.layout_tokens(grid) + sum(budget_counts(n, (tiles - 1) * n if tiles > 1 else 0, ratio))
    return adapter.geometry(size).num_tokens(ratio)


def _layout(adapter, plan) -> int:
    """Prompt tokens of a planned image besides its placeholders (0 for LLaVA: its newlines are features)."""
    if isinstance(adapter, InternVLAdapter):
        return adapter.layout_tokens(plan.grid if plan.num_crops else (1, 1))
    return 0


def _serving_count(processor, size: tuple[int, int]) -> int | None:
    """What vLLM reads (``_get_num_multimodal_tokens``); None where the processor has none (SmolVLM)."""
    if not hasattr(processor, "_get_num_multimodal_tokens"):
        return None
    return int(processor._get_num_multimodal_tokens(image_sizes=[list(size)]).num_image_tokens[0])


def test_processor_count_equals_features_and_fits_the_budget(fam):
    family, model, processor = fam
    images = {size: random_image(*size, seed=i) for i, size in enumerate(SIZES)}
    full = {size: _prompt_count(family, model, processor, im) for size, im in images.items()}
    compressed = whole = 0
    for size, image in images.items():
        with globalcom2.apply(model, processor, ratio=1e-9) as h:  # counts of layout tokens only (R ~ 0)
            floor = _count_at(h.adapter, size, 1e-9)
        budgets = {floor, floor + 1, (floor + full[size]) // 2, full[size] - 1, full[size], full[size] + 7}
        for t in sorted(b for b in budgets if b >= max(floor, 1)):
            with globalcom2.apply(model, processor, max_image_tokens=t) as h:
                count = _prompt_count(family, model, processor, image)
                plan = h.adapter.plan_for_image(h, image)
                features = plan.num_tokens + _layout(h.adapter, plan)
                serving = _serving_count(processor, size)
                assert count == features == (features if serving is None else serving) <= t, (size, t)
                r = h.adapter.ratio_for_image(*size)
                assert plan.ratio == r and plan.num_tokens_full + features - plan.num_tokens == full[size]
                if full[size] <= t:  # fits: left whole
                    assert r == 1.0 and count == full[size] and plan.num_tokens == plan.num_tokens_full
                    whole += 1
                else:  # the most tokens that fit, at the largest R that gives them
                    assert t - 1 <= count <= t and count == _count_at(h.adapter, size, r)
                    assert _count_at(h.adapter, size, math.nextafter(r, 2.0)) > t
                    compressed += 1
    assert compressed >= 2 * len(SIZES) and whole >= len(SIZES)


def test_budget_below_the_layout_tokens_is_one_clear_error(fam):
    family, model, processor = fam
    size = (100, 180)
    with globalcom2.apply(model, processor, ratio=1e-9) as h:
        floor = _count_at(h.adapter, size, 1e-9)  # newlines / markers only
    assert floor >= 1
    assert floor > 1  # newline rows (LLaVA), <img></img> (InternVL), crop markers and newlines (Idefics3)
    with globalcom2.apply(model, processor, max_image_tokens=floor - 1):
        with pytest.raises(ValueError) as err:
            inputs_for(family, processor, [random_image(*size)])
        assert f"max_image_tokens={floor - 1} is too small" in str(err.value) and "\n" not in str(err.value)


def test_generate_on_a_mixed_batch_and_whole_images_match_the_plain_model(fam):
    family, model, processor = fam
    images = family.images(seed=5)
    full = [_prompt_count(family, model, processor, im) for im in images]
    assert min(full) < max(full)
    t = min(full)  # the smallest image fits, the others are compressed
    small = images[full.index(min(full))]
    plain = inputs_for(family, processor, [small])
    with torch.no_grad():
        plain_logits = model(**plain).logits
    with globalcom2.apply(model, processor, max_image_tokens=t) as h:
        inputs = inputs_for(family, processor, images)
        out = greedy(model, inputs)
        assert out.shape == (len(images), 4)
        counts = [_prompt_count(family, model, processor, im) for im in images]
        assert [p.num_tokens + _layout(h.adapter, p) for p in h.plans] == counts
        assert all(c == f if f <= t else t - 1 <= c <= t for c, f in zip(counts, full, strict=True))
        assert any(p.ratio == 1.0 for p in h.plans) and any(p.ratio < 1.0 for p in h.plans)
        with torch.no_grad():
            logits = model(**inputs_for(family, processor, [small])).logits
    assert torch.equal(logits, plain_logits)  # left whole: exactly the uncompressed model


def test_idefics3_layout_counts_every_marker_as_tokenised_and_unsplit_images_fit(fam):
    """Idefics3 / SmolVLM: the overhead is the processor's own layout as its tokenizer tokenises it (the pure formula
    of the docs table, for every grid up to 6 x 6), it depends on the grid (2 x 3 and 3 x 2 differ), and an image the
    processor does not split (the global image alone, 3 markers) follows the same rule."""
    family, model, processor = fam
    if family.name not in IDEFICS3:
        pytest.skip("Idefics3 / SmolVLM layout")
    pair = len(processor.tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    with globalcom2.apply(model, processor, max_image_tokens=100) as h:
        for rows in range(1, 7):
            for cols in range(1, 7):
                assert h.adapter.layout_tokens((rows, cols)) == idefics3_layout_tokens(rows, cols, pair)
        assert h.adapter.layout_tokens((2, 3)) + 1 == h.adapter.layout_tokens((3, 2))  # one more crop row
        assert h.adapter.layout_tokens((1, 1)) == 3  # <fake><global-img> ... <fake>
    processor.image_processor.do_image_splitting = False
    image = random_image(120, 200)
    full = _prompt_count(family, model, processor, image)
    assert full == processor.image_seq_len + 3
    for t in (3, 4, full - 1, full, full + 3):
        with globalcom2.apply(model, processor, max_image_tokens=t) as h:
            count = _prompt_count(family, model, processor, image)
            plan = h.adapter.plan_for_image(h, image)
            assert plan.num_crops == 0 and count == plan.num_tokens + 3 <= t
            assert plan.ratio == h.adapter.ratio_for_image(120, 200)
            assert count == (full if full <= t else t) and (plan.ratio == 1.0) == (full <= t)
    with globalcom2.apply(model, processor, max_image_tokens=2):
        with pytest.raises(ValueError, match="max_image_tokens=2 is too small .* gives it 3 tokens"):
            inputs_for(family, processor, [image])


# -- exactly one budget ----------------------------------------------------------------------------------------------
BOTH = "pass either `ratio` or `max_image_tokens`, not both"
POSITIVE = "`max_image_tokens` must be a positive int, got"


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"ratio": 0.5, "max_image_tokens": 100}, ValueError, BOTH),
        ({"max_image_tokens": 0}, ValueError, f"{POSITIVE} 0"),
        ({"max_image_tokens": -5}, ValueError, f"{POSITIVE} -5"),
        ({"max_image_tokens": 100.0}, TypeError, f"{POSITIVE} float 100.0"),
        ({"max_image_tokens": "100"}, TypeError, f"{POSITIVE} str '100'"),
        ({"max_image_tokens": True}, TypeError, f"{POSITIVE} bool"),
        (
            {"max_image_tokens": 100, "mode": "reference"},
            ValueError,
            "`max_image_tokens` needs mode='budget'",
        ),
    ],
)
def test_config_errors_are_one_line(kwargs, exc, words):
    for build in (lambda: GlobalComConfig(**kwargs), lambda: GlobalComConfig.from_kwargs(None, **kwargs)):
        with pytest.raises(exc) as err:
            build()
        assert words in str(err.value) and "\n" not in str(err.value)


def test_config_budget_rules():
    assert GlobalComConfig().ratio == 0.25 and GlobalComConfig().max_image_tokens is None
    assert GlobalComConfig(ratio=None).ratio == 0.25  # None means "not given"
    cfg = GlobalComConfig(max_image_tokens=300)
    assert cfg.ratio is None and cfg.max_image_tokens == 300 and cfg.budget_label == "max_image_tokens=300"
    assert GlobalComConfig.from_kwargs(None, **cfg.to_dict()) == cfg  # round trip (vLLM / lmms-eval options)
    # a budget given as an override replaces the base config's budget
    assert GlobalComConfig.from_kwargs(cfg, ratio=0.5) == GlobalComConfig(ratio=0.5)
    assert GlobalComConfig.from_kwargs(GlobalComConfig(ratio=0.5), max_image_tokens=9).max_image_tokens == 9
    assert GlobalComConfig.from_kwargs(cfg, ratio=None).max_image_tokens == 300
    with pytest.raises(ValueError, match="not both"):
        GlobalComConfig.from_kwargs(cfg, ratio=0.5, max_image_tokens=300)


def test_apply_and_apply_method_refuse_both_and_leave_the_model_untouched(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="not both"):
        globalcom2.apply(model, processor, ratio=0.5, max_image_tokens=100)
    with pytest.raises(ValueError, match="not both"):
        apply_method(model, processor, "globalcom2", ratio=0.5, max_image_tokens=100)
    with pytest.raises(ValueError, match="not both"):
        apply_method(model, processor, "pooling", ratio=0.5, max_image_tokens=100)
    for method in ("fastv", "globalcom2+fastv"):
        with pytest.raises(TypeError) as err:
            apply_method(model, processor, method, max_image_tokens=100)
        assert f"method {method!r} does not support max_image_tokens" in str(err.value)
    assert "_globalcom2_handle" not in model.__dict__ and "_get_number_of_features" not in processor.__dict__
    with apply_method(model, processor, "globalcom2", max_image_tokens=100) as h:
        assert h.config.max_image_tokens == 100 and h.config.ratio is None
    with apply_method(model, processor, "fastv", layer=1) as h:  # no budget given: R = 0.25, as before
        assert h.method_options["ratio"] == 0.25


@pytest.mark.parametrize("method", ["fastervlm", "random", "pooling"])
def test_vision_baselines_take_the_budget(tiny, method):
    model, processor = tiny
    family = next(f for f in FAMILIES if f.name == "llava_next")
    sizes = ((100, 180), (61, 183), (150, 150), (180, 100))
    images = [random_image(*s, seed=i) for i, s in enumerate(sizes)]
    full = [_prompt_count(family, model, processor, im) for im in images]
    t = sorted(full)[1] + 1
    with apply_method(model, processor, method, max_image_tokens=t) as h:
        assert h.method_options["max_image_tokens"] == t and h.method_options["ratio"] is None
        counts = [_prompt_count(family, model, processor, im) for im in images]
        out = greedy(model, inputs_for(family, processor, images))
        assert out.shape[0] == len(images)
        assert [p.num_tokens for p in h.plans] == counts
        for size, count, f, plan in zip(sizes, counts, full, h.plans, strict=True):
            assert count <= t and (count == f if f <= t else count < f)
            if f > t:
                geo = h.adapter.geometry(size)
                above = math.nextafter(plan.ratio, 2.0)
                nxt = pooling_counts(geo, above) if method == "pooling" else geo.num_tokens(above)
                assert nxt > t  # the largest R whose (method's own) count fits


# -- CLI (real subprocesses) -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    random_image(120, 200, seed=3).save(path)
    return path


def test_cli_ask_and_visualize_with_max_image_tokens(tiny_clip_dir, photo, tmp_path):
    res = run_cli("ask", "--model", str(tiny_clip_dir), "--image", str(photo), "--max-image-tokens", "60",
                  "--max-new-tokens", "3", "--json", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["max_image_tokens"] == 60 and data["image_tokens"] <= 60 < data["image_tokens_full"]
    saved = data["image_tokens_full"] - data["image_tokens"]
    assert data["prompt_tokens_full"] - data["prompt_tokens"] == saved
    model, processor = load(tiny_clip_dir)
    with globalcom2.apply(model, processor, max_image_tokens=60) as h:
        from PIL import Image

        with Image.open(photo) as im:
            expected = h.adapter.num_image_tokens(im.height, im.width)
            assert data["ratio"] == h.adapter.ratio_for_image(im.height, im.width)
    assert data["image_tokens"] == expected

    out = tmp_path / "t.png"
    res = run_cli("visualize", "--model", str(tiny_clip_dir), "--image", str(photo), "--max-image-tokens", "60",
                  "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (plan,) = json.loads(res.stdout)["plans"]
    assert plan["max_image_tokens"] == 60 and plan["num_tokens"] == expected and out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (("--ratio", "0.25", "--max-image-tokens", "60"), "not allowed with argument"),
        (("--max-image-tokens", "0"), "max image tokens must be a positive integer, got 0"),
        (("--max-image-tokens", "ten"), "max image tokens must be a positive integer, got 'ten'"),
        (("--max-image-tokens", "60", "--mode", "reference"), "`max_image_tokens` needs mode='budget'"),
        ((), "one of the arguments --ratio --max-image-tokens is required"),
    ],
)
def test_cli_budget_errors_are_one_line(tiny_clip_dir, photo, args, words):
    res = run_cli("ask", "--model", str(tiny_clip_dir), "--image", str(photo), *args, "What?")
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- the documented table ----------------------------------------------------------------------------------------------
def test_docs_table_is_the_code_output_and_follows_the_rule():
    from pathlib import Path

    from globalcom2.evaluation.budget_table import FAMILIES as TABLE_FAMILIES
    from globalcom2.evaluation.budget_table import SIZES as TABLE_SIZES
    from globalcom2.evaluation.budget_table import all_tables, image_counts

    doc = (Path(__file__).resolve().parents[2] / "docs" / "max_image_tokens.md").read_text(encoding="utf-8")
    assert all_tables() in doc  # regenerate with `python scripts/budget_table.py`
    for family in TABLE_FAMILIES:
        for size in TABLE_SIZES:
            full = image_counts(family, size, None).tokens
            for t in (288, 576, 1200):
                cell = image_counts(family, size, GlobalComConfig(max_image_tokens=t))
                assert cell.tokens == full if full <= t else t - 1 <= cell.tokens <= t
    with pytest.raises(ValueError, match="max_image_tokens=30 is too small .* gives it 48 tokens"):
        image_counts("LLaVA-NeXT-7B", (1024, 1024), GlobalComConfig(max_image_tokens=30))
