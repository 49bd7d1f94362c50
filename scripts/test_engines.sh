#!/usr/bin/env bash
# Engine plugin tests (lmms-eval and vLLM), each in its own fresh virtual environment: the separate CI step.
#   bash scripts/test_engines.sh [VENV_ROOT]      (default $TMPDIR/globalcom2-engines)
# About 15 min on 2 CPU cores: the installs, 9 offline vLLM engines and 6 `vllm serve` servers.
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
