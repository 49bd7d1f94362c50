"""Run the real vLLM offline on a local checkpoint and write what it did as JSON (used by test_vllm.py).

One vLLM engine per process (vLLM keeps process-wide state), so the test runs this script in a subprocess:

    python tests/plugins/vllm_runner.py MODEL_DIR OUT.json [--hf-overrides JSON] [--max-tokens N]
        [--image-token <IMG_CONTEXT>]

Images are the test suite's smooth random images (``tests.conftest.random_image``) at the sizes given by
``--sizes 100x60,50x110``; the prompt is ``tests.conftest.PROMPT`` with ``<image>`` replaced by ``--image-token``. Greedy decoding, fp32, one engine process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) with a small KV cache: the set-up documented in docs/design.md §9.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--hf-overrides", default=None)
    parser.add_argument("--sizes", default="100x60,50x110,150x64")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--image-token", default="<image>")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vllm import LLM, SamplingParams

    from tests.conftest import PROMPT, random_image

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    kwargs = {"hf_overrides": json.loads(args.hf_overrides)} if args.hf_overrides else {}
    llm = LLM(
        model=args.model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False, **kwargs,
    )  # fmt: skip
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
