#!/usr/bin/env bash
# Run the test suite offline, on every core, with caches in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
