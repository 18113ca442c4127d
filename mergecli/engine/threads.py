"""Compute threads matched to the cores this process may really use."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores in this process's affinity mask, capped by a cgroup CPU quota (containers):
    torch's default counts the host's cores, which oversubscribes a limited container."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


@contextmanager
def compute_threads() -> Iterator[int]:
    """Run torch's intra-op pool on the available cores (unless OMP_NUM_THREADS chooses),
    restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    threads = before if os.environ.get("OMP_NUM_THREADS") else available_cores()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
