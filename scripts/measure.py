"""Run a command as a whole process and measure its wall time, CPU time and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss * 1024,
                  usage.ru_utime + usage.ru_stime]))
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Starts the command from a small process: Linux carries a process's peak RSS across fork and
exec, so a command forked straight from a benchmark that holds generated tensors would report
at least the benchmark's own memory."""


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: float = 0.0
    """User + system CPU time of the process (steadier than wall time on a busy machine)."""


def measure(command: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Wall time, CPU time and peak RSS (``ru_maxrss`` from ``wait4``) of ``command``; raises
    on failure. stderr goes to a file, so a talkative command cannot block on a full pipe."""
    with tempfile.TemporaryFile() as log:
        run = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        if run.returncode != 0:
            log.seek(0)
            stderr = log.read().decode(errors="replace")
            raise RuntimeError(f"{' '.join(command)} failed ({run.returncode}): {stderr[-2000:]}")
    seconds, peak, cpu = json.loads(run.stdout)
    return Measurement(seconds, peak, cpu)
