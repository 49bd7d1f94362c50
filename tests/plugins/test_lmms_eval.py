"""lmms-eval plugin: loaded through the `lmms_eval.models` entry point, run on a tiny local LLaVA-NeXT.

Needs lmms-eval (``bash scripts/setup_engines.sh lmms-eval VENV``); skipped cleanly without it. Requests are built
by hand (``lmms_eval.api.instance.Instance``) over an in-memory task: no dataset download.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import random_image

lmms_eval = pytest.importorskip("lmms_eval")
pytest.importorskip("accelerate")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

TASK, SPLIT = "gc_demo", "test"
# A LLaVA-style chat template (real llava-hf checkpoints ship one) for string and list contents (simple/chat class).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Image sizes with 2x1, 1x2 and 3x1 crop grids (tile 64; pinpoints of the tiny model), two of them padded.
SIZES = [(100, 60), (50, 110), (150, 64)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from transformers import AutoProcessor

    from globalcom2.demo.tiny_model import build_tiny_llava_next

    path = build_tiny_llava_next(tmp_path_factory.mktemp("lmms_tiny"))
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def docs():
    return [
        {"image": random_image(h, w, seed=i), "question": f"What is shown {i}?", "answer": " a cat"}
        for i, (h, w) in enumerate(SIZES)
    ]


def _load(name: str, ckpt, simple: bool = True, **options):
    args = ",".join([f"pretrained={ckpt}", "dtype=float32", *(f"{k}={v}" for k, v in options.items())])
    lm = get_model(name, force_simple=simple).create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})
    return lm


def _with_docs(lm, docs):
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def _meta(i: int) -> dict:
    return {"task": TASK, "doc_id": i, "repeats": 1}


def _gen_requests(docs, max_new_tokens: int = 4) -> list[Instance]:
    return [
        Instance(
            request_type="generate_until",
            arguments=(
                d["question"],
                {"max_new_tokens": max_new_tokens, "until": ["</s>"]},
                lambda doc: [doc["image"]],
                i,
                TASK,
                SPLIT,
            ),
            idx=0,
            metadata=_meta(i),
        )  # fmt: skip
        for i, d in enumerate(docs)
    ]


def _chat_requests(docs, max_new_tokens: int = 4) -> list[Instance]:
    def to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]  # fmt: skip

    return [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], to_messages, {"max_new_tokens": max_new_tokens}, i, TASK, SPLIT),
            idx=0,
            metadata=_meta(i),
        )  # fmt: skip
        for i, d in enumerate(docs)
    ]


def _ll_requests(docs, continuations=(" a cat", " a red rocket")) -> list[Instance]:
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(d["question"], cont, lambda doc: [doc["image"]], i, TASK, SPLIT),
            idx=j,
            metadata=_meta(i),
        )  # fmt: skip
        for i, d in enumerate(docs)
        for j, cont in enumerate(continuations)
    ]


def test_entry_point_registers_the_models():
    eps = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "globalcom2"]
    assert len(eps) == 1 and eps[0].value == "globalcom2.plugins:lmms_eval_manifests"
    from globalcom2.plugins.lmms_eval import GlobalComLlavaHf, GlobalComLlavaHfChat

    assert get_model("globalcom2_llava_hf") is GlobalComLlavaHfChat  # chat by default, like llava_hf
    assert get_model("globalcom2_llava_hf", force_simple=True) is GlobalComLlavaHf
    assert get_model("globalcom2_llava_hf_chat") is GlobalComLlavaHfChat


def test_generate_and_loglikelihood_with_and_without_compression(ckpt, docs):
    # lmms-eval's own model, no compression (its default device_map="" is refused by transformers 5: name it).
    base = _with_docs(_load("llava_hf", ckpt, device_map="cpu"), docs)
    full = _with_docs(_load("globalcom2_llava_hf", ckpt, ratio=1.0), docs)  # ours at R = 1
    comp = _with_docs(_load("globalcom2_llava_hf", ckpt, ratio=0.25, allocation="softmax-sum"), docs)
    assert comp.globalcom.config.ratio == 0.25 and comp.globalcom.active

    # generate_until: one request at a time through the host's own loop; check the image-token count of each.
    out_base, out_full, out_comp = [], [], []
    for req_b, req_f, req_c, (h, w) in zip(
        _gen_requests(docs), _gen_requests(docs), _gen_requests(docs), SIZES, strict=True
    ):
        out_base += base.generate_until([req_b])
        out_full += full.generate_until([req_f])
        out_comp += comp.generate_until([req_c])
        (plan_full,) = full.globalcom.plans
        (plan,) = comp.globalcom.plans
        assert plan_full.num_tokens == plan_full.num_tokens_full  # R = 1 keeps everything
        assert plan.num_tokens == comp.globalcom.adapter.num_image_tokens(h, w)  # the budget-mode formula
        assert plan.num_tokens < 0.5 * plan.num_tokens_full
    expected = [comp.globalcom.adapter.num_image_tokens(h, w) for h, w in SIZES]
    full_total = full.globalcom_stats["visual_tokens_full"]
    assert full.globalcom_stats == {
        "images": 3,
        "visual_tokens": full_total,
        "visual_tokens_full": full_total,
    }
    assert comp.globalcom_stats == {
        "images": 3,
        "visual_tokens": sum(expected),
        "visual_tokens_full": full_total,
    }
    # The host swallows generation errors into "": non-empty strings prove every request generated.
    assert all(isinstance(t, str) and t for t in out_base + out_full + out_comp)
    assert out_full == out_base  # R = 1 in budget mode is exactly the uncompressed model

    # loglikelihood: continuation-only mean NLL; at R = 1 it equals a hand-rolled HF computation.
    ll_full = full.loglikelihood(_ll_requests(docs))
    ll_comp = comp.loglikelihood(_ll_requests(docs))
    assert len(ll_full) == len(ll_comp) == 2 * len(docs)
    for nll, greedy in ll_full + ll_comp:
        assert isinstance(greedy, bool) and 0.0 < nll < 50.0
    assert [round(v, 4) for v, _ in ll_full] != [
        round(v, 4) for v, _ in ll_comp
    ]  # fewer visual tokens change it

    model, processor = base.model, base._image_processor
    for (nll, greedy), req in zip(ll_full, _ll_requests(docs), strict=True):
        context, cont, _, i, _, _ = req.args
        prompt, whole = full._loglikelihood_texts(context, cont, 1)
        image = docs[i]["image"]
        enc = processor(text=[whole], images=[image], return_tensors="pt")
        n_ctx = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        labels = enc["input_ids"].clone()
        labels[:, :n_ctx] = -100
        with torch.inference_mode():
            out = model(**enc, labels=labels)
        assert nll == pytest.approx(float(out.loss), rel=1e-4, abs=1e-5)
        # logits at position t predict token t + 1
        assert greedy == bool((out.logits[0, n_ctx - 1 : -1].argmax(-1) == enc["input_ids"][0, n_ctx:]).all())


def test_chat_class_generates_compressed(ckpt, docs):
    lm = _with_docs(_load("globalcom2_llava_hf", ckpt, simple=False, ratio=0.1), docs)
    assert type(lm).__name__ == "GlobalComLlavaHfChat"
    results = lm.generate_until(_chat_requests(docs))  # all requests in one call, through the host's loop
    assert len(results) == 3 and all(r.text for r in results)
    expected = [lm.globalcom.adapter.num_image_tokens(h, w) for h, w in SIZES]
    assert lm.globalcom_stats["images"] == 3 and lm.globalcom_stats["visual_tokens"] == sum(expected)
    for req, (h, w) in zip(_chat_requests(docs), SIZES, strict=True):
        (res,) = lm.generate_until([req])
        assert res.text  # GenerationResult; "" would mean the host swallowed an error
        (plan,) = lm.globalcom.plans
        assert plan.num_tokens == lm.globalcom.adapter.num_image_tokens(h, w) < plan.num_tokens_full


def test_reference_mode_runs_both_request_types(ckpt, docs):
    lm = _with_docs(_load("globalcom2_llava_hf", ckpt, ratio=0.25, mode="reference"), docs[:2])
    outs = lm.generate_until(_gen_requests(docs[:2]))
    assert all(outs)
    lls = lm.loglikelihood(_ll_requests(docs[:2]))
    assert len(lls) == 4 and all(0.0 < v < 50.0 for v, _ in lls)
    assert all(p.mode == "reference" and p.num_tokens < p.num_tokens_full for p in lm.globalcom.plans)


def test_max_image_tokens_in_model_args_caps_every_image(ckpt, docs):
    whole = _load("globalcom2_llava_hf", ckpt, ratio=1.0).globalcom.adapter
    full = [whole.num_image_tokens(h, w) for h, w in SIZES]  # R = 1: the uncompressed counts
    t = sorted(full)[1]  # the smaller images fit, the largest is compressed to at most t tokens
    assert t < max(full)
    lm = _with_docs(_load("globalcom2_llava_hf", ckpt, max_image_tokens=t), docs)
    assert lm.globalcom.config.max_image_tokens == t and lm.globalcom.config.ratio is None
    for req, (h, w), f in zip(_gen_requests(docs), SIZES, full, strict=True):
        (out,) = lm.generate_until([req])
        assert out  # "" would mean the host swallowed an error
        (plan,) = lm.globalcom.plans
        assert plan.num_tokens == lm.globalcom.adapter.num_image_tokens(h, w) and plan.num_tokens_full == f
        assert plan.num_tokens == f if f <= t else t - 1 <= plan.num_tokens <= t
        assert plan.ratio == lm.globalcom.adapter.ratio_for_image(h, w)
    assert lm.globalcom_stats["visual_tokens"] < lm.globalcom_stats["visual_tokens_full"]


def test_bad_option_fails_before_loading(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="`ratio` must be in"):
        get_model("globalcom2_llava_hf", force_simple=True).create_from_arg_string(
            f"pretrained={missing},ratio=1.5", {"device": "cpu"}
        )
    with pytest.raises(ValueError, match="pass either `ratio` or `max_image_tokens`, not both"):
        get_model("globalcom2_llava_hf").create_from_arg_string(
            f"pretrained={missing},ratio=0.5,max_image_tokens=300", {"device": "cpu"}
        )
    with pytest.raises(ValueError, match="`allocation` must be one of"):
        get_model("globalcom2_llava_hf").create_from_arg_string(
            f"pretrained={missing},allocation=max", {"device": "cpu"}
        )


TASK_YAML = """
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
task: {name}
test_split: test
output_type: {output_type}
doc_to_visual: !function gc_utils.doc_to_visual
doc_to_text: !function gc_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].strip())}
"""


@pytest.mark.slow
def test_cli_accelerate_launch_evaluates_a_local_task(ckpt, docs, tmp_path):
    """`accelerate launch -m lmms_eval --model globalcom2_llava_hf ...` end to end on a task saved to disk."""
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "data"
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    rows = {k: [d[k] for d in docs] for k in ("image", "question", "answer")}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(data)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gc_utils.py").write_text(TASK_UTILS)
    # generate_until only: lmms-eval 0.7.3's evaluator turns every (logprob, is_greedy) response into a string
    # (`unwrap_generation_output`), so its loglikelihood / multiple_choice tasks fail for every model in that
    # version; our `loglikelihood` is exercised directly above.
    yaml = TASK_YAML.format(data=data, name="gc_gen", output_type="generate_until", metric="exact_match")
    (tasks / "gc_gen.yaml").write_text(yaml + "process_results: !function gc_utils.process_results\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
        "-m", "lmms_eval", "--model", "globalcom2_llava_hf", "--force_simple",
        "--model_args", f"pretrained={ckpt},ratio=0.25,dtype=float32",
        "--tasks", "gc_gen", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG",  # DEBUG: errors raise (exit != 0)
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert re.search(r"\|gc_gen\s*\|", log)  # the results table
    samples = {p.name.split("_samples_")[1]: p for p in out.rglob("*_samples_*.jsonl")}
    gen = [json.loads(line) for line in samples["gc_gen.jsonl"].read_text().splitlines()]
    assert len(gen) == len(docs) and all(g["filtered_resps"] for g in gen)
    # Our running totals, logged after the requests: every image compressed to the budget-mode count.
    from globalcom2.adapters.anyres import anyres_geometry

    pinpoints = json.loads((ckpt / "config.json").read_text())["image_grid_pinpoints"]
    geos = [anyres_geometry((h, w), pinpoints, 64, 8) for h, w in SIZES]
    kept = sum(geo.num_tokens(0.25) for geo in geos)
    full = sum(geo.num_tokens(None) for geo in geos)
    lines = re.findall(r"GlobalCom² \(R=0.25\): (\d+) images, visual tokens (\d+) -> (\d+)", log)
    assert lines and tuple(map(int, lines[-1])) == (len(SIZES), full, kept)
