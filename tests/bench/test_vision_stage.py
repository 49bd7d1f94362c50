"""`globalcom2 bench --vision-stage`: the side-by-side record is complete and its instrumentation leaves nothing behind.

Behaviour only (no timing assertions): every figure is present and positive, the targets are judged on them, the
instrumented scoring time is non-zero (the hooks really were timed) and the model is unpatched afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from globalcom2.bench.vision_stage import (
    StageSettings,
    bench_family,
    build_family_model,
    evaluate_stage_targets,
    format_stage,
    next_target,
    share_target,
)
from tests.conftest import sweep


def test_targets_scale_with_depth():
    assert abs(next_target(24) - 0.97) < 1e-12 and abs(share_target(24) - 0.01) < 1e-12
    assert next_target(3) < next_target(24) and share_target(3) == 0.08


def test_one_family_record():
    settings = StageSettings(
        families=("llava_next",), layers=2, repeats=1, instrumented=1, selection_repeats=2
    )
    rec = bench_family("llava_next", settings, log=lambda _: None)
    assert rec["tiles"] == 5 and not rec["needs_last_layer"]
    for key in ("plain_ms", "compressed_ms", "scoring_ms", "selection_ms", "selection_1thread_ms",
                "batch_selection_ms", "loop_selection_ms", "prefill_plain_ms", "prefill_compressed_ms"):  # fmt: skip
        assert rec[key] > 0, key
    # on a CPU the one-thread target reads the replay's CPU time (wall time is kept beside it)
    assert rec["selection_1thread_cpu_ms"] > 0 and rec["selection_cost_clock"] == "CPU time"
    assert rec["selection_cost_ms"] == rec["selection_1thread_cpu_ms"]
    assert len(rec["selection_1thread_cpu_runs"]) == len(rec["selection_1thread_runs"]) == 2
    targets = evaluate_stage_targets([rec], 2)
    assert [t["unit"] for t in targets] == ["x", "ms"]
    assert targets[1]["value"] == rec["selection_cost_ms"] and "(CPU time)" in targets[1]["target"]
    table = format_stage(
        {"meta": {"device": "cpu", "settings": vars(settings)}, "records": [rec], "targets": targets}
    )
    assert "| llava_next | 5 |" in table and "selection of a 5-tile image" in table
    assert "batch of 8: batched / one call each" in table and "selection, 1 thread: wall / CPU" in table


def test_batched_planning_replay_equals_one_call_per_image():
    """What the batch column times: one plan_images call for 3 copies of an InternVL image (reference mode, a
    data-dependent count) gives the plans and indices of three separate calls."""
    import globalcom2
    from globalcom2.bench.measure import bench_image
    from globalcom2.bench.vision_stage import _batch_replay

    model, processor, token = build_family_model("internvl", 1)
    with globalcom2.apply(model, processor, ratio=0.3, mode="reference") as handle:
        inputs = processor(images=[bench_image(600, 900)], text=[f"{token} hi"], return_tensors="pt")
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            batched, loop = _batch_replay(handle, lambda: model.model.get_image_features(**vision), 3)
            together, apart = batched(), loop()
    assert len(together) == len(apart) == 3
    for (p, i), (q, j) in zip(together, [r[0] for r in apart], strict=True):
        assert torch.equal(i, j) and torch.equal(p.crops_mask, q.crops_mask) and p.num_tokens == q.num_tokens


def test_internvl_tower_is_tapped_not_recomputed():
    """InternVL reads the last layer: its scores come from the layer's own q/k hooks (forward hooks on q_norm and
    k_norm), and a direct tower call after removal equals one before."""
    import globalcom2

    model, processor, _ = build_family_model("internvl", 1)
    tower = model.model.vision_tower
    att = tower.encoder.layer[-1].attention
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        before = tower(x).last_hidden_state
    with globalcom2.apply(model, processor, ratio=0.25):
        assert len(att.q_norm._forward_hooks) == 1 and len(att.k_norm._forward_hooks) == 1
        with torch.no_grad():
            during = tower(x).last_hidden_state
    with torch.no_grad():
        after = tower(x).last_hidden_state
    assert not att.q_norm._forward_hooks and torch.equal(before, during) and torch.equal(before, after)


def test_cli_vision_stage_json(tmp_path):
    out = tmp_path / "stage.json"
    proc = subprocess.run(
        [sys.executable, "-m", "globalcom2", "bench", "--vision-stage", "--layers", "1", "--repeats", "1",
         "--families", "llava_next", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| llava_next |" in proc.stdout and "Targets" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["family"] for r in result["records"]] == ["llava_next"]
    assert result["meta"]["settings"]["layers"] == 1
    bad = subprocess.run(
        [sys.executable, "-m", "globalcom2", "bench", "--vision-stage", "--families", "nope"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "unknown --families" in bad.stderr


def test_qwen_record_at_real_width():
    """Qwen2.5-VL's row: real tower width, scoring folded into the selection, the one-image selection target."""
    settings = StageSettings(
        families=("qwen2_5_vl",), layers=1, repeats=1, instrumented=1, selection_repeats=2, selection_batch=2
    )
    rec = bench_family("qwen2_5_vl", settings, log=lambda _: None)
    assert rec["needs_last_layer"] and rec["scoring_ms"] == 0.0
    for key in ("plain_ms", "compressed_ms", "selection_ms", "selection_1thread_ms", "batch_selection_ms"):
        assert rec[key] > 0, key
    targets = evaluate_stage_targets([rec], 1)
    assert [t["unit"] for t in targets] == ["%", "ms"] and "selection (Eq. 7 scoring included)" in targets[1][
        "target"
    ]


@pytest.mark.parametrize(
    "family", sweep(["aya_vision", "gemma3", "llama4", "cohere2_vision"], ["aya_vision"])
)
def test_tiling_family_bench_models_give_five_tiles_and_their_budget(family):
    """The real-width Gemma 3 / Aya Vision / Llama 4 models of the bench: their image is 5 tiles (the 2 ms target's size) and
    a budget-mode encode keeps exactly the processor's count."""
    import globalcom2
    from globalcom2.bench.measure import bench_image
    from globalcom2.bench.vision_stage import _CALL_KWARGS

    model, processor, token = build_family_model(family, 1)
    image = bench_image(*StageSettings().image_sizes[family])
    kwargs = _CALL_KWARGS.get(family, {})
    with globalcom2.apply(model, processor, ratio=0.25) as handle:
        inputs = processor(images=[image], text=[f"{token} hi"], return_tensors="pt", **kwargs)
        assert inputs["pixel_values"].shape[0] == 5
        vision = {
            k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids")
        }
        with torch.no_grad():
            getattr(model, "model", model).get_image_features(**vision)  # Llama 4 has no inner model
        plan = handle.plans[0]
    assert plan.num_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum()) > 0
