#!/usr/bin/env bash
# Engine plugin tests (lmms-eval and vLLM), each in its own fresh virtual environment: the separate CI step.
#   bash scripts/test_engines.sh [VENV_ROOT]      (default $TMPDIR/globalcom2-engines; ~5 min on 2 CPU cores, mostly installs)
# The main test run skips tests/plugins cleanly (neither engine is installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-${TMPDIR:-/tmp}/globalcom2-engines}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for engine in lmms-eval vllm; do
  bash scripts/setup_engines.sh "$engine" "$root/$engine"
  "$root/$engine/bin/python" -m pytest -q -p no:cacheprovider "tests/plugins/test_${engine//-/_}.py"
done
