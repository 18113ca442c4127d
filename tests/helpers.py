"""Test helpers: reading whole checkpoints for dense reference computations, running the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergecli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (tests only: the whole model in memory)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def write_random_experts(
    root: Path, tensors: int, shape: tuple[int, ...], experts: int, seed: int, varied: bool
) -> list[str]:
    """A single-file base of ``tensors`` random MLP weights in ``root/base`` and experts
    ``root/e<t>`` = base + scale · noise (scale 0.1, or a random scale per tensor when
    ``varied``); returns the tensor names."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(tensors)]
    base = {n: torch.randn(shape, generator=gen) for n in names}
    (root / "base").mkdir()
    save_file(base, root / "base" / "model.safetensors")
    for t in range(experts):
        (root / f"e{t}").mkdir()
        scales = torch.rand(tensors, generator=gen) if varied else torch.full((tensors,), 0.1)
        state = {
            n: b + s * torch.randn(shape, generator=gen)
            for (n, b), s in zip(base.items(), scales, strict=True)
        }
        save_file(state, root / f"e{t}" / "model.safetensors")
    return names


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> Any:
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def run_module(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m mergecli ...`` in a subprocess, with this checkout importable."""
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mergecli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


PEAK_JOB = """
import json, re, sys, threading, time

def _anon():
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\\s+(\\d+)", f.read()).group(1)) * 1024

{body}

# numba and the compiled loops (report sums, magnitude histograms) are ~40 MB of code, once per
# process: loaded before the measurement, which counts what the work holds
import numpy
from mergecli.methods.row_sums import row_sums
from mergecli.methods.histogram import add_digits
row_sums(numpy.ones(1, numpy.float32), numpy.ones(1, numpy.float32))
add_digits(numpy.ones(1, numpy.int32), 16, -1, numpy.zeros(1 << 16, numpy.int64))

_peak, _done = [0], threading.Event()

def _sample():
    while not _done.is_set():
        _peak[0] = max(_peak[0], _anon())
        time.sleep(0.001)

_start = _anon()
_thread = threading.Thread(target=_sample)
_thread.start()
_out = work()
_done.set()
_thread.join()
print(json.dumps({{"peak": _peak[0] - _start, **(_out or {{}})}}))
"""


def peak_memory_job(body: str, *args: str) -> dict[str, Any]:
    """Run ``body`` (Python that defines ``work()``, returning a dict or None) in its own process
    with ``args`` as ``sys.argv[1:]``; a thread samples the anonymous resident memory (tensors,
    not memory-mapped checkpoint files) during ``work()``. glibc's mmap threshold is pinned so
    freed tensors go back to the system. Returns ``work()``'s dict plus ``peak`` (bytes above
    the memory before ``work()``)."""
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_JOB.format(body=body), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
