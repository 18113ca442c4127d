"""scripts/bench_gpu.sh: skips cleanly without CUDA; its CPU path runs every step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "bench_gpu.sh"), *args],
        capture_output=True,
        text=True,
        env={"PYTHON": str(ROOT / ".venv" / "bin" / "python"), "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_nothing_is_measured() -> None:
    run = bench()
    assert run.returncode == 0, run.stderr
    assert "CUDA is not available" in run.stdout


@pytest.mark.slow
def test_cpu_path_measures_and_checks_outputs(tmp_path: Path) -> None:
    run = bench(
        "--device",
        "cpu",
        "--size-mb",
        "1",
        "--methods",
        "linear,dare_ties",
        "--bench-dir",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    assert "| mergecli dare_ties |" in run.stdout and "| I/O floor |" in run.stdout
    assert "- dare_ties: max |cpu − cpu| = 0" in run.stdout
