#!/usr/bin/env bash
# Installs what `globalcom2 explore` and its browser test need, into the active Python environment:
# - the [app] extra (Gradio) and Selenium from PyPI;
# - Chromium and its WebDriver from the OS (Debian packages `chromium` and `chromium-driver`; root or sudo), unless
#   both are already on PATH. The test drives /usr/bin/chromium through /usr/bin/chromedriver (override with
#   GLOBALCOM2_CHROMIUM / GLOBALCOM2_CHROMEDRIVER).
set -euo pipefail
python -m pip install -q -e ".[app]" "selenium>=4.20"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi
