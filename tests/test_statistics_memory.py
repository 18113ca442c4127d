"""Model-scope statistics passes keep memory bounded: the peak of a model-scope TIES merge is
that of a tensor-scope one plus the fixed histograms, never the whole task vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergecli.methods.statistics import BINS
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # measures peak memory of whole merges in subprocesses

TENSORS, SIDE = 60, 256
"""A model of many small tensors: 16 MB in float32, its largest tensor 256 KB."""

MEASURE = """
import json, sys, threading, time
import mergecli
from mergecli.recipe import recipe_from_dict

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

plan = mergecli.plan_merge(recipe_from_dict(json.loads(sys.argv[1])))
# numba and the report's compiled loop take a fixed ~40 MB: loaded first, not counted
import numpy
from mergecli.methods.row_sums import row_sums
row_sums(numpy.ones(1, numpy.float32), numpy.ones(1, numpy.float32))
before, peak, stop = anon(), [0], threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

thread = threading.Thread(target=sample)
thread.start()
mergecli.run_merge(plan, sys.argv[2])
stop.set()
thread.join()
print(peak[0] - before)
"""


def write_model(folder: Path, base: dict[str, torch.Tensor] | None, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        state = {
            f"model.layers.{i}.mlp.proj.weight": torch.randn(SIDE, SIDE, generator=gen)
            for i in range(TENSORS)
        }
    else:
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return state


def start_measured_merge(recipe: dict, out: Path, setup: str = "") -> subprocess.Popen[str]:
    """A fresh process that merges and prints the growth of its anonymous resident memory
    (``setup``: Python run first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", setup + MEASURE, json.dumps(recipe), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_model_scope_ties_peak_is_tensor_scope_plus_histograms(tmp_path: Path) -> None:
    base = write_model(tmp_path / "base", None, 0)
    for t in range(3):
        write_model(tmp_path / f"e{t}", base, t + 1)
    model_bytes = sum(v.nbytes for v in base.values())
    recipe = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"e{t}")} for t in range(3)],
        "parameters": {"density": 0.2},
    }
    runs = {}
    for scope in ("model", "tensor"):
        scoped = {**recipe, "parameters": {"density": 0.2, "scope": scope}}
        runs[scope] = start_measured_merge(scoped, tmp_path / f"out-{scope}")
    peaks = {}
    for scope, run in runs.items():
        stdout, _ = run.communicate()
        assert run.returncode == 0
        peaks[scope] = int(stdout.split()[-1])
    histograms = 3 * BINS * 8
    slack = 8 * 2**20  # thread timing: how many tensors sit in the read and write queues
    assert peaks["model"] <= peaks["tensor"] + histograms + slack, peaks
    # holding the three task vectors, as a concatenation would, is far above that bound
    assert 3 * model_bytes > histograms + 4 * slack
