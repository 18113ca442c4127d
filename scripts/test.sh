#!/usr/bin/env bash
# Run the test suite offline, on every core. The fast tier by default (skips tests marked slow:
# long end-to-end merges); `--full` (or MERGECLI_FULL_TESTS=1) runs everything, as CI does:
# first every test but the Ray ones on every core, then the Ray tests (marked ray: a local
# 2-CPU cluster in the pytest process) in one process of their own, so the cluster never
# competes with other test workers and a crash of it cannot stall the worker pool. Other
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
pytest() {  # "no tests collected" (exit 5) is success: arguments may name no Ray test
    local rc=0
    .venv/bin/python -m pytest "$@" || rc=$?
    [[ $rc -eq 0 || $rc -eq 5 ]] || return $rc
}
full=${MERGECLI_FULL_TESTS:-}
if [[ "${1:-}" == "--full" ]]; then
    shift
    full=1
fi
if [[ -z "$full" ]]; then
    exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" -m "not slow" "$@"
fi
pytest -n "${PYTEST_WORKERS:-auto}" -m "not ray" "$@"
pytest -p no:xdist -m ray "$@"
