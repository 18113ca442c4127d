"""Run a command as a whole process and measure its wall time and peak resident memory."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: float = 0.0
    """User + system CPU time of the process (steadier than wall time on a busy machine)."""


def measure(command: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Wall time, CPU time and peak RSS (``ru_maxrss`` of the child, from ``wait4``); raises
    on failure. stderr goes to a file, so a talkative child cannot block on a full pipe."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            stderr = log.read().decode(errors="replace")
            raise RuntimeError(
                f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}"
            )
    return Measurement(seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)
