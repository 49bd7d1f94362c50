"""Property-based tests (hypothesis, 500 examples each) of the core and of the counts it shares with HF.

Every expectation is computed independently of the code under test: valid areas and token counts by HF's own
``unpad_image`` / processor formula, top-k by a numpy stable sort, budget splits by exact integer arithmetic.
Images, grids, ratios and scores are drawn at random, with quantised scores to provoke ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from globalcom2.adapters.anyres import AnyresGeometry, plan_anyres, valid_box
from globalcom2.config import GlobalComConfig
from globalcom2.core import ALLOCATIONS, SCORINGS, budget_counts, split_budget
from globalcom2.core.layout import grid_to_tiles
from tests.core.reference_plain import plain_sequence

PROPERTY = settings(max_examples=500, deadline=None, database=None)
CLIP336_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# -- independent references -------------------------------------------------------------------------------
def hf_unpadded(h: int, w: int, grid_h: int, grid_w: int) -> tuple[torch.Tensor, int, int]:
    """HF's own unpadding of a (grid_h, grid_w) patch grid: (valid mask, unpadded rows, unpadded cols)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    cells = torch.arange(grid_h * grid_w).reshape(1, grid_h, grid_w)
    kept = unpad_image(cells, [h, w])
    mask = torch.zeros(grid_h * grid_w, dtype=torch.bool)
    mask[kept.reshape(-1)] = True
    return mask.reshape(grid_h, grid_w), int(kept.shape[1]), int(kept.shape[2])


def stable_top(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> set[int]:
    """Indices of the k highest scores (ties: lower index first), among ``allowed`` positions."""
    idx = np.arange(scores.size) if allowed is None else np.flatnonzero(allowed)
    order = idx[np.lexsort((idx, -scores[idx].astype(np.float64)))]
    return set(order[:k].tolist())


@dataclass
class Case:
    g: int
    rows: int
    cols: int
    size: tuple[int, int]
    ratio: float
    thumb: torch.Tensor
    crops: torch.Tensor
    allocation: str
    scoring: str
    alpha: float
    tau: float


ratios = st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1, 0.7, 0.57, 1e-6]), st.floats(1e-6, 1.0))


@st.composite
def cases(draw, max_g: int = 8) -> Case:
    g = draw(st.integers(2, max_g))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    size = (draw(st.integers(1, 6000)), draw(st.integers(1, 6000)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    thumb = torch.randn(g * g, generator=gen) * 2
    crops = torch.randn(rows * cols, g * g, generator=gen) * 2
    quant = draw(st.sampled_from([0, 0, 1, 3]))  # 1 and 3: integer-valued scores, many exact ties
    if quant:
        thumb, crops = (thumb * quant).round(), (crops * quant).round()
    if draw(st.booleans()):  # softmax-like positive scores (paper Eq. 1)
        thumb, crops = thumb.softmax(-1), crops.softmax(-1)
    return Case(
        g, rows, cols, size, draw(ratios), thumb, crops,
        draw(st.sampled_from(ALLOCATIONS)), draw(st.sampled_from(SCORINGS)),
        draw(st.floats(0.0, 1.0)), draw(st.floats(0.05, 100.0)),
    )  # fmt: skip


def geometry(case: Case) -> AnyresGeometry:
    """LLaVA-NeXT geometry of the case: its grid, the valid box by HF's rule, crop tokens = the valid box."""
    box = valid_box(case.size[0], case.size[1], case.rows * case.g, case.cols * case.g)
    return AnyresGeometry((case.rows, case.cols), case.g, box, (box[1] - box[0], box[3] - box[2]))


def run(case: Case, mode: str, thumb=None, crops=None, **over):
    """The LLaVA-NeXT plan of the case (reference mode in the official token order) and its index into HF's packed
    sequence."""
    kw = dict(
        ratio=case.ratio, mode=mode, allocation=case.allocation, scoring=case.scoring, alpha=case.alpha,
        tau=case.tau,
    )  # fmt: skip
    kw.update(over)
    thumb = case.thumb if thumb is None else thumb
    crops = case.crops if crops is None else crops
    tile_scores = torch.cat([thumb[None], crops])
    return plan_anyres(tile_scores, geometry(case), GlobalComConfig(**kw), official_order=True)


def per_crop(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*g, cols*g) grid mask -> (n,) True-counts per crop."""
    return grid_to_tiles(mask, rows, cols).flatten(1).sum(1)


# -- properties ---------------------------------------------------------------------------------------------
@PROPERTY
@given(cases())
def test_budget_keeps_exactly_the_documented_count(case):
    plan, index = run(case, "budget")
    g, n_tok = case.g, case.g * case.g
    valid, uh, uw = hf_unpadded(*case.size, case.rows * g, case.cols * g)
    expected = int(n_tok * case.ratio) + int(case.ratio * (uh * uw)) + uh  # README formula, HF geometry
    assert plan.num_tokens == index.numel() == expected
    assert geometry(case).num_tokens(case.ratio) == expected
    assert plan.num_tokens_full == geometry(case).num_tokens(None) == n_tok + uh * uw + uh
    assert int(plan.thumbnail_mask.sum()) == int(n_tok * case.ratio)
    assert int(plan.crops_mask.sum()) == int(case.ratio * int(valid.sum()))
    # HF packs the thumbnail's n_tok tokens, then uh rows of uw crop tokens each followed by a newline.
    newlines = {n_tok + y * (uw + 1) + uw for y in range(uh)}
    assert sum(int(i) in newlines for i in index.tolist()) == uh  # one newline per unpadded row, as HF packs
    assert index.unique().numel() == index.numel()  # no token twice
    assert all(0 <= int(i) < plan.num_tokens_full for i in index.tolist())  # rows of HF's packed sequence
    # The emitted order, written out: thumbnail in raster order, then every unpadded row's kept tokens + newline.
    order = plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()
    box = geometry(case).box
    assert index.tolist() == plain_sequence(order, plan.crops_mask.tolist(), plan.grid, box, g, "budget")


@PROPERTY
@given(st.integers(1, 400), st.integers(1, 400), st.one_of(ratios, st.integers(1, 99).map(lambda p: p / 100)))
def test_budget_count_is_r_times_the_integer_area(h, w, ratio):
    """int(R * sum N_j), not int(R * h * w): they differ by one for e.g. R = 0.57, 62 x 150 valid cells."""
    # g = 1 and an image with the grid's own aspect: no padding, the valid area is all h x w cells.
    assert budget_counts(1, h * w, ratio) == (int(ratio), int(ratio * (h * w)))
    box = valid_box(h, w, h, w)
    assert box == (0, h, 0, w)
    geo = AnyresGeometry((h, w), 1, box, (h, w))
    assert geo.num_tokens(ratio) == int(ratio) + int(ratio * (h * w)) + h


def test_budget_count_regression_057():
    assert budget_counts(4, 62 * 150, 0.57) == (int(4 * 0.57), 5301)
    geo = AnyresGeometry((31, 75), 2, valid_box(62, 150, 62, 150), (62, 150))
    assert geo.num_tokens(0.57) == int(4 * 0.57) + 5301 + 62


@PROPERTY
@given(cases(), st.sampled_from(["budget", "reference"]))
def test_per_crop_counts_within_bounds_and_masks_inside_the_valid_area(case, mode):
    plan, _ = run(case, mode)
    g = case.g
    valid, _, _ = hf_unpadded(*case.size, case.rows * g, case.cols * g)
    assert not bool((plan.crops_mask & ~valid).any())  # nothing kept in the padding
    kept = per_crop(plan.crops_mask, case.rows, case.cols)
    n_j = per_crop(valid, case.rows, case.cols)
    assert torch.equal(plan.crop_valid_counts.cpu(), n_j)
    assert torch.equal(plan.crop_keep_counts.cpu(), kept)
    assert bool(((kept >= 0) & (kept <= n_j)).all())
    assert bool(((plan.crop_ratios > 0) & (plan.crop_ratios <= 1)).all())
    if mode == "reference":  # official per-crop count int(N_j * r_j)
        r = (
            plan.crop_ratios.double()
            if case.allocation != "uniform"
            else torch.full_like(n_j, case.ratio, dtype=torch.float64)
        )
        assert torch.equal(kept, (n_j.double() * r).floor().long())


@PROPERTY
@given(cases(), st.sampled_from(["budget", "reference"]))
def test_thumbnail_keeps_top_int_n_r(case, mode):
    plan, index = run(case, mode)
    k = int(case.g * case.g * case.ratio)
    kept = set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist())
    assert kept == stable_top(case.thumb.numpy(), k)
    emitted = index[:k].tolist()  # the thumbnail's tokens come first
    assert set(emitted) == kept
    if mode == "budget":
        assert emitted == sorted(emitted)  # raster order
    else:  # descending score order (official)
        s = case.thumb.numpy()[emitted]
        assert all(s[i] >= s[i + 1] for i in range(len(s) - 1))


@PROPERTY
@given(cases(), st.sampled_from(["budget", "reference"]))
def test_deterministic_across_runs_and_thread_counts(case, mode):
    plan_a, index_a = run(case, mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan_b, index_b = run(case, mode, thumb=case.thumb.clone(), crops=case.crops.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(index_a, index_b)
    assert torch.equal(plan_a.thumbnail_mask, plan_b.thumbnail_mask)
    assert torch.equal(plan_a.crops_mask, plan_b.crops_mask)
    assert torch.equal(plan_a.crop_ratios, plan_b.crop_ratios)
    assert torch.equal(plan_a.crop_keep_counts, plan_b.crop_keep_counts)


@PROPERTY
@given(cases())
def test_uniform_reference_is_per_tile_topk(case):
    """allocation='uniform', scoring='local' in reference mode == FasterVLM: top int(N_j * R) of every crop."""
    plan, _ = run(case, "reference", allocation="uniform", scoring="local")
    g, rows, cols = case.g, case.rows, case.cols
    valid, _, _ = hf_unpadded(*case.size, rows * g, cols * g)
    valid_tiles = grid_to_tiles(valid, rows, cols).reshape(rows * cols, -1).numpy()
    kept_tiles = grid_to_tiles(plan.crops_mask, rows, cols).reshape(rows * cols, -1).numpy()
    for j in range(rows * cols):
        k = int(int(valid_tiles[j].sum()) * case.ratio)
        expected = stable_top(case.crops[j].numpy(), k, valid_tiles[j])
        assert set(np.flatnonzero(kept_tiles[j]).tolist()) == expected, j


@PROPERTY
@given(cases())
def test_uniform_budget_is_per_tile_topk_with_largest_remainders(case):
    """Budget mode, uniform: K = int(R * sum N_j) split over crops by N_j (Hamilton), top-k_j of every crop."""
    plan, _ = run(case, "budget", allocation="uniform", scoring="local")
    g, rows, cols = case.g, case.rows, case.cols
    valid, _, _ = hf_unpadded(*case.size, rows * g, cols * g)
    valid_tiles = grid_to_tiles(valid, rows, cols).reshape(rows * cols, -1).numpy()
    kept_tiles = grid_to_tiles(plan.crops_mask, rows, cols).reshape(rows * cols, -1).numpy()
    n_j = valid_tiles.sum(1).astype(int)
    total_n = int(n_j.sum())
    big_k = int(case.ratio * total_n)
    k = kept_tiles.sum(1).astype(int)
    assert int(k.sum()) == big_k
    if total_n:
        # Exact quotas big_k * N_j / total_n: every crop gets its floor or its ceiling, and the crops that got
        # the extra token have remainders at least as large as those that did not (largest remainders).
        floor, rem = np.divmod(big_k * n_j, total_n)
        assert np.all((k == floor) | (k == floor + 1))
        extra, plain = rem[k == floor + 1], rem[(k == floor) & (k < n_j)]
        if extra.size and plain.size:
            assert extra.min() >= plain.max()
    for j in range(rows * cols):
        expected = stable_top(case.crops[j].numpy(), int(k[j]), valid_tiles[j])
        assert set(np.flatnonzero(kept_tiles[j]).tolist()) == expected, j


@PROPERTY
@given(cases())
def test_ratio_one_keeps_everything_in_budget_mode(case):
    plan, index = run(case, "budget", ratio=1.0)
    valid, _, _ = hf_unpadded(*case.size, case.rows * case.g, case.cols * case.g)
    assert bool(plan.thumbnail_mask.all()) and torch.equal(plan.crops_mask, valid)
    assert plan.num_tokens == plan.num_tokens_full == index.numel()


@PROPERTY
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 9),
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, 0.3, 0.7]),
)
def test_split_budget_sums_respects_capacity_and_stays_within_one_of_water_filling(seed, n, share, zero_p):
    gen = np.random.default_rng(seed)
    cap = gen.integers(0, 40, n)
    w = gen.random(n) * (gen.random(n) >= zero_p)
    total = int(share * cap.sum())
    counts = split_budget(total, torch.tensor(w), torch.tensor(cap)).numpy()
    assert int(counts.sum()) == total
    assert np.all((counts >= 0) & (counts <= cap))
    # Real-valued water filling, written out independently: a_j = min(cap_j, lam * w_j), sum a_j = total.
    ww = np.where(cap > 0, w, 0.0)
    ww = ww if ww.sum() > 0 else cap.astype(float)
    capped = np.zeros(n, bool)
    for _ in range(n + 1):
        free = ww * ~capped
        lam = (total - cap[capped].sum()) / free.sum() if free.sum() > 0 else 0.0
        a = np.where(capped, cap, lam * ww)
        over = (a > cap) & ~capped
        if not over.any():
            break
        capped |= over
    a = np.minimum(a, cap)
    if ww[cap > 0].min(initial=1.0) > 0:  # weighted crops only: zero-weight crops take leftovers, not quotas
        assert np.all(np.abs(counts - a) < 1 + 1e-9)


# -- counts shared with HF: processor formula, model unpadding, our formula, the planner ------------------------
@pytest.fixture(scope="module")
def clip336():
    """A LLaVA-NeXT with CLIP-336 geometry (24x24 patches, llava-v1.6 pinpoints), built in memory, tiny widths."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from globalcom2.demo.tiny_model import build_tokenizer

    tok = build_tokenizer()
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    config = LlavaNextConfig(  # type: ignore[call-arg]
        vision_config=vision, text_config=text, image_grid_pinpoints=CLIP336_PINPOINTS,
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(config).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=CLIP336_PINPOINTS)  # fmt: skip
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    return model, processor


@pytest.fixture(scope="module")
def tiny_module(tiny_clip_dir):
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny_clip_dir)


def _count_property(model, processor, size, ratio, mode, seed):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from globalcom2.adapters.llava_next import LlavaNextAdapter
    from globalcom2.config import GlobalComConfig

    h, w = size
    tile = model.config.vision_config.image_size
    g = tile // model.config.vision_config.patch_size
    adapter = LlavaNextAdapter(model, processor, GlobalComConfig(ratio=ratio, mode=mode))
    rows, cols = get_anyres_image_grid_shape([h, w], model.config.image_grid_pinpoints, tile)
    _, uh, uw = hf_unpadded(h, w, rows * g, cols * g)
    hf_model_count = g * g + uh * uw + uh  # base features + HF's unpadded grid + one newline per row
    hf_processor_count = processor._get_number_of_features(h, w, tile, tile) - 1  # 'default' drops [CLS]
    geo = adapter.geometry((h, w))
    assert geo.grid == (rows, cols)
    assert hf_processor_count == hf_model_count == geo.num_tokens(None)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(1 + rows * cols, g * g, generator=gen)
    plan, index = adapter.plan_image(scores, geo)
    assert plan.num_tokens == index.numel() and plan.num_tokens_full == hf_model_count
    if mode == "budget":
        ours = adapter._num_features(processor._get_number_of_features, h, w, tile, tile) - 1
        expected = int(g * g * ratio) + int(ratio * (uh * uw)) + uh  # README formula, HF geometry
        assert ours == plan.num_tokens == adapter.num_image_tokens(h, w) == expected


@PROPERTY
@given(st.integers(1, 10000), st.integers(1, 10000), ratios, st.sampled_from(["budget", "reference"]),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_counts_agree_with_hf_clip336(clip336, h, w, ratio, mode, seed):
    """llava-v1.6 geometry: HF processor == HF model unpadding == our formulas == the planner, any image size."""
    _count_property(*clip336, (h, w), ratio, mode, seed)


@PROPERTY
@given(st.integers(1, 10000), st.integers(1, 10000), ratios, st.sampled_from(["budget", "reference"]),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_counts_agree_with_hf_tiny(tiny_module, h, w, ratio, mode, seed):
    _count_property(*tiny_module, (h, w), ratio, mode, seed)


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=4),
    ratios,
    st.sampled_from(["budget", "reference"]),
    st.integers(0, 2**31 - 1),
    st.randoms(use_true_random=False),
)
def test_pack_is_independent_of_batch_order(tiny_module, sizes, ratio, mode, seed, rnd):
    """The adapter's packing of a batch == the same images in any other order, image for image."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from globalcom2.adapters.base import GlobalComHandle
    from globalcom2.adapters.llava_next import LlavaNextAdapter
    from globalcom2.config import GlobalComConfig

    model, processor = tiny_module
    cfg = GlobalComConfig(ratio=ratio, mode=mode)
    adapter = LlavaNextAdapter(model, processor, cfg)
    handle = GlobalComHandle(model, processor, cfg, adapter)
    # The adapter's wrapper around HF's own pack_image_features (what install() patches in), not installed.
    pack_image_features = adapter._packing(handle, model.model.pack_image_features)
    gen = torch.Generator().manual_seed(seed)
    tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, adapter.tile) for s in sizes]
    feats = [torch.randn(t, adapter.g**2, 6, generator=gen) for t in tiles]
    scores = [torch.randn(t, adapter.g**2, generator=gen) for t in tiles]
    newline = torch.randn(6, generator=gen)

    def pack(order):
        handle.state.scores = [torch.cat([scores[i] for i in order])]  # as the scoring hook records them
        packed, lens = pack_image_features([feats[i] for i in order], torch.tensor([sizes[i] for i in order]),
                                           "default", image_newline=newline)  # fmt: skip
        assert handle.state.scores == []  # consumed by this pack
        return {i: (packed[k], int(lens[k]), handle.plans[k]) for k, i in enumerate(order)}

    order = list(range(len(sizes)))
    shuffled = order[:]
    rnd.shuffle(shuffled)
    a, b = pack(order), pack(shuffled)
    for i in order:
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] == a[i][2].num_tokens
        assert torch.equal(a[i][2].thumbnail_mask, b[i][2].thumbnail_mask)
        assert torch.equal(a[i][2].crops_mask, b[i][2].crops_mask)
