#!/usr/bin/env bash
# Engine plugin tests (lmms-eval and vLLM), each in its own fresh virtual environment: the separate CI step.
#   bash scripts/test_engines.sh [VENV_ROOT]      (default $TMPDIR/globalcom2-engines)
# About an hour on 2 shared CPU cores (vLLM parts measured before the Qwen families: 0.32 offline tests 9 min, the 3
# servers 13 min, the 0.33 step 10 min; each Qwen family adds about 5 min offline and 5 min of server, Idefics3 and
# Gemma 3 each 3 min offline and 2-4 min of server, Llama 4 and Cohere2 Vision together 3 min offline, 4 min of server
# and 4 min in the 0.33 step): the installs, 32 offline vLLM engines and 9 `vllm serve` servers
# (one per family in the default tier, shared by its checks; Qwen2-VL, the same diff as Qwen2.5-VL, adds its engines
# and server with --full), then the offline tests and the LLaVA-NeXT, Qwen3-VL and Idefics3 servers again on vLLM
# 0.33's Python source (setup_engines.sh vllm-0.33 says why only that much of 0.33 can run here).
# The main test run skips tests/plugins cleanly (neither engine is installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-${TMPDIR:-/tmp}/globalcom2-engines}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for engine in lmms-eval vllm; do
  bash scripts/setup_engines.sh "$engine" "$root/$engine"
  tests=("tests/plugins/test_${engine//-/_}.py")
  if [ "$engine" = vllm ]; then
    tests+=(tests/plugins/test_vllm_serve.py)  # a real `vllm serve` per family and budget
  fi
  "$root/$engine/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
done
bash scripts/setup_engines.sh vllm-0.33 "$root/vllm"
# vLLM 0.33's Python (its models, multimodal processing, engine, scheduler, OpenAI server) over the CPU build's
# kernels: the offline tests (less the environment-switch variant; registration, counts, positions and engines of every
# family) and the LLaVA-NeXT, Qwen3-VL (deepstack) and Idefics3 (marker spans) servers.
PYTHONPATH="$root/vllm/vllm-0.33-source${PYTHONPATH:+:$PYTHONPATH}" GLOBALCOM2_EXPECT_VLLM=0.33 \
  "$root/vllm/bin/python" -m pytest -q -p no:cacheprovider tests/plugins/test_vllm.py -k "not environment_switch_with"
PYTHONPATH="$root/vllm/vllm-0.33-source${PYTHONPATH:+:$PYTHONPATH}" GLOBALCOM2_EXPECT_VLLM=0.33 \
  "$root/vllm/bin/python" -m pytest -q -p no:cacheprovider tests/plugins/test_vllm_serve.py -k "llava_next or qwen3_vl or idefics3"
