"""Run the real vLLM offline on a local checkpoint and write what it did as JSON (used by test_vllm.py).

One vLLM engine per process (vLLM keeps process-wide state), so the test runs this script in a subprocess:

    python tests/plugins/vllm_runner.py MODEL_DIR OUT.json [--hf-overrides JSON] [--max-tokens N]
        [--image-token <IMG_CONTEXT>] [--requests REQUESTS.json]

Images are the test suite's smooth random images (``tests.conftest.random_image``) at the sizes given by
``--sizes 100x60,50x110``; the prompt is ``tests.conftest.PROMPT`` with ``<image>`` replaced by ``--image-token``. Greedy decoding, fp32, one engine process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) with a small KV cache: the set-up documented in docs/design.md §9.

With ``--requests`` the engine instead answers a JSON list of chat-rendered requests ``{"prompt": str, "images":
[[h, w, seed], ...], "mm_processor_kwargs": {...}}`` one at a time, with the prefix cache and the multimodal processor
cache off (the fresh-engine reference of the serving tests), and records each one's prompt length, greedy tokens,
their log-probabilities and the plans of its images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def plan_records(model) -> list[dict]:
    """JSON record of the GlobalCom² plans of the model's last batch (empty for the stock model)."""
    return [plan_record(p) for p in getattr(model, "globalcom_plans", [])]


def plan_record(plan) -> dict:
    return {
        **plan.summary(),
        "thumbnail_mask": plan.thumbnail_mask.flatten().int().tolist(),
        "crops_mask": plan.crops_mask.flatten().int().tolist(),
    }


def answer(llm, requests: list[dict], max_tokens: int) -> list[dict]:
    """Greedy answers (tokens, their log-probabilities, prompt length, plans) to chat-rendered requests."""
    from vllm import SamplingParams

    from tests.conftest import random_image

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, seed=0)
    out = []
    for r in requests:  # one at a time, so the model's last plans are this request's
        images = [random_image(h, w, seed=seed) for h, w, seed in r["images"]]
        request = {"prompt": r["prompt"], "multi_modal_data": {"image": images},
                   "mm_processor_kwargs": r.get("mm_processor_kwargs") or {}}  # fmt: skip
        result = llm.generate([request], params, use_tqdm=False)[0]
        o = result.outputs[0]
        steps = [step[token] for step, token in zip(o.logprobs, o.token_ids, strict=True)]
        out.append({
            "prompt_length": len(result.prompt_token_ids), "generated": list(o.token_ids),
            "logprobs": [s.logprob for s in steps], "plans": llm.apply_model(plan_records)[0],
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--hf-overrides", default=None)
    parser.add_argument("--sizes", default="100x60,50x110,150x64")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--image-token", default="<image>")
    parser.add_argument("--requests", default=None)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vllm import LLM, SamplingParams

    from tests.conftest import PROMPT, random_image

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    kwargs = {"hf_overrides": json.loads(args.hf_overrides)} if args.hf_overrides else {}
    requests = json.loads(Path(args.requests).read_text()) if args.requests else None
    most = max((len(r["images"]) for r in requests), default=1) if requests else 1
    llm = LLM(
        model=args.model, dtype="float32", max_model_len=4096 if requests else 2048, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": most}, enable_prefix_caching=False, mm_processor_cache_gb=0, **kwargs,
    )  # fmt: skip
    if requests is not None:
        Path(args.out).write_text(json.dumps(answer(llm, requests, args.max_tokens)))
        return
    config = llm.llm_engine.model_config.hf_config
    image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs, plans = [], []
    for i, (h, w) in enumerate(sizes):  # one request at a time, so the model's last plans are this image's
        prompt = PROMPT.replace("<image>", args.image_token)
        request = {"prompt": prompt, "multi_modal_data": {"image": random_image(h, w, seed=i)}}
        outputs += llm.generate([request], params, use_tqdm=False)
        plans.append(llm.apply_model(plan_records)[0])
    result = {
        "architecture": llm.llm_engine.model_config.architecture,
        "sizes": sizes,
        "image_token_id": image_token_id,
        "num_image_tokens": [o.prompt_token_ids.count(image_token_id) for o in outputs],
        "prompt_lengths": [len(o.prompt_token_ids) for o in outputs],
        "generated": [list(o.outputs[0].token_ids) for o in outputs],
        "plans": plans,
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
