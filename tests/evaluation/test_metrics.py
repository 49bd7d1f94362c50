"""Fidelity metrics on synthetic reference maps: values known by construction."""

from __future__ import annotations

import math

import torch

from globalcom2 import GlobalComConfig
from globalcom2.adapters.anyres import AnyresGeometry, plan_anyres, valid_box
from globalcom2.evaluation.metrics import build_reference, plan_metrics
from globalcom2.methods.vision import plan_pooling

G = 8
GRID = (2, 2)
SIZE = (100, 180)  # wide: the crop grid has padded rows
BOX = valid_box(SIZE[0], SIZE[1], GRID[0] * G, GRID[1] * G)
GEO = AnyresGeometry(GRID, G, BOX, (BOX[1] - BOX[0], BOX[3] - BOX[2]))


def plan_scores(thumb, crops, **options):
    """GlobalCom²'s plan of the LLaVA-NeXT geometry ``GEO`` (what the adapter computes) from raw scores."""
    return plan_anyres(torch.cat([thumb[None], crops]), GEO, GlobalComConfig(**options))


def _reference(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    thumb = torch.rand(G * G, generator=gen) ** 4  # peaked, like attention
    crops = torch.rand(n, G * G, generator=gen) ** 4
    feats = torch.randn(n, G * G, 16, generator=gen) + 3.0  # a shared offset, like real ViT features
    return build_reference(thumb, crops, feats, grid=GRID, valid_box=BOX), thumb, crops


def test_reference_maps_are_distributions():
    ref, _, _ = _reference()
    top, bottom, left, right = ref.valid_box
    assert math.isclose(float(ref.mass.sum()), 1.0, rel_tol=1e-5)
    assert float(ref.mass.sum()) == float(ref.mass[top:bottom, left:right].sum())  # nothing on padding
    assert math.isclose(float(ref.crop_mass.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(ref.weights.sum()), 1.0, rel_tol=1e-5)


def test_keep_everything_scores_one():
    ref, thumb, crops = _reference()
    plan, _ = plan_scores(thumb, crops, ratio=1.0)
    m = plan_metrics(plan, ref)
    assert math.isclose(m["crop_mass"], 1.0, rel_tol=1e-5) and math.isclose(
        m["thumb_mass"], 1.0, rel_tol=1e-5
    )
    assert math.isclose(m["feat_cos"], 1.0, rel_tol=1e-5) and math.isclose(
        m["feat_cos_centred"], 1.0, rel_tol=1e-4
    )


def test_top_mass_beats_bottom_mass():
    ref, thumb, crops = _reference()
    mass_tiles = ref.mass.reshape(2, G, 2, G).permute(0, 2, 1, 3).reshape(4, G * G)
    best, _ = plan_scores(thumb, mass_tiles, ratio=0.25, scoring="local")
    worst, _ = plan_scores(-thumb, -mass_tiles, ratio=0.25, scoring="local")
    mb, mw = plan_metrics(best, ref), plan_metrics(worst, ref)
    assert mb["crop_mass"] > 0.25 > mw["crop_mass"]
    assert mb["thumb_mass"] > mw["thumb_mass"]


def test_allocation_statistics():
    ref, thumb, crops = _reference()
    uniform, _ = plan_scores(thumb, crops, ratio=0.25, allocation="uniform")
    adaptive, _ = plan_scores(thumb, crops, ratio=0.25, tau=0.001)
    mu, ma = plan_metrics(uniform, ref), plan_metrics(adaptive, ref)
    assert mu["share_cv"] < 0.02 and math.isnan(mu["share_mass_corr"])
    assert ma["share_cv"] > 0.1 and ma["share_max"] > ma["share_min"]
    q = adaptive.crop_keep_counts.double() / adaptive.crop_valid_counts.double()
    assert math.isclose(ma["share_min"], float(q.min())) and math.isclose(ma["share_max"], float(q.max()))


def test_pooling_uses_bin_means():
    ref, _, _ = _reference()
    plan = plan_pooling(GEO, 0.25)
    m = plan_metrics(plan, ref)
    assert math.isnan(m["crop_mass"]) and math.isnan(m["thumb_mass"])
    # plain recomputation: weighted sum of bin means with bin weights
    cover = plan.crops_cover.reshape(-1)
    w = ref.weights.reshape(-1)
    x = ref.features.reshape(w.numel(), -1)
    f_kept = torch.zeros(x.shape[1])
    for b in range(int(cover.max()) + 1):
        cells = cover == b
        f_kept += w[cells].sum() * x[cells].mean(0)
    expected = float(torch.nn.functional.cosine_similarity(f_kept, w @ x, dim=0))
    assert math.isclose(m["feat_cos"], expected, rel_tol=1e-5)
    assert m["share_cv"] < 0.2


def test_native_reference_follows_the_regions_and_eq7():
    """Qwen-VL's reference (docs/eval.md): the regions of at most G x G merged tokens are the crops, each token's
    local weight is its Eq. 7 score against its region's mean renormalised over the region, times the region's share
    of the pooled view's map; the pooled view is the adaptive average pool of the grid scored by Eq. 7 against the
    image mean. Written out here token by token."""
    from globalcom2.evaluation.metrics import native_reference

    height, width, g = 20, 23, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(height * width, 8, generator=gen, dtype=torch.float64) + 2.0
    ref = native_reference(x.float(), (height, width), g)
    nr, nc = math.ceil(height / g), math.ceil(width / g)
    assert ref.grid == (nr, nc) and ref.valid_box == (0, height, 0, width)
    region = [((y + 1) * nr - 1) // height * nc + ((x_ + 1) * nc - 1) // width
              for y in range(height) for x_ in range(width)]  # fmt: skip
    cos = torch.nn.functional.cosine_similarity
    local = torch.zeros(height * width, dtype=torch.float64)
    for r in range(nr * nc):
        members = [i for i, q in enumerate(region) if q == r]
        mean = x[members].mean(0)
        for i in members:
            local[i] = -cos(x[i], mean, dim=0)
    sums = torch.zeros(nr * nc, dtype=torch.float64).index_add_(0, torch.tensor(region), local)
    local = local / sums[torch.tensor(region)]
    mass = ref.mass.reshape(-1).double()
    assert bool((mass >= 0).all()) and math.isclose(float(mass.sum()), 1.0, rel_tol=1e-5)
    crop_mass = [float(mass[[i for i, q in enumerate(region) if q == r]].sum()) for r in range(nr * nc)]
    torch.testing.assert_close(
        ref.crop_mass.double(), torch.tensor(crop_mass, dtype=torch.float64), atol=1e-6, rtol=0
    )
    weights = local * torch.tensor(crop_mass, dtype=torch.float64)[torch.tensor(region)]
    torch.testing.assert_close(
        ref.weights.reshape(-1).double(), weights / weights.sum(), atol=1e-5, rtol=1e-4
    )
    cells = torch.nn.functional.adaptive_avg_pool2d(
        x.T.reshape(1, -1, height, width), (min(height, g), min(width, g))
    )
    cells = cells.reshape(x.shape[1], -1).T
    thumb = -cos(cells, x.mean(0)[None], dim=-1)
    torch.testing.assert_close(ref.thumb_attention.double(), thumb / thumb.sum(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref.features.reshape(-1, 8).double(), x, atol=1e-6, rtol=0)
