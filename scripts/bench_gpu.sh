#!/usr/bin/env bash
# One prepared GPU measurement (scripts/bench_gpu.py): under 5 minutes, skips without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m scripts.bench_gpu "$@"
