#!/usr/bin/env bash
# Create or reuse .venv/ in the repo root and install chanzoo with its test extras.
# Installs Debian's dataset-fashion-mnist package when apt is available and the data is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # torch and torchvision as one matched pair (PyPI's newest torchvision needs the torch it was built for).
  .venv/bin/pip install -q "torch>=2.4" "torchvision>=0.19"
fi
.venv/bin/pip install -q -e ".[dev]"
