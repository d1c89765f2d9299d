#!/usr/bin/env bash
# Set up .venv/ (scripts/setup.sh) and run the default training: SmallCNN + SE on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train.py "$@"
