#!/usr/bin/env bash
# Run the test suite offline, on every core. The fast tier by default (skips tests marked slow:
# long end-to-end merges); `--full` (or MERGECLI_FULL_TESTS=1) runs everything, as CI does.
# The Ray tests share one xdist worker (--dist loadgroup, group "ray"). Other arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
tier=(-m "not slow")
if [[ "${1:-}" == "--full" ]]; then
    shift
    tier=()
elif [[ -n "${MERGECLI_FULL_TESTS:-}" ]]; then
    tier=()
fi
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "${tier[@]}" "$@"
