"""What every command that writes a folder does around its streams: the target checked before
anything is read, one runner (timer and progress), the folder written beside the target under
its lock (stale folders removed, free space checked, removed again on an error or a signal)
and renamed into place when complete, the progress stopped at the end."""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergecli.engine.output import atomic_folder, check_output
from mergecli.engine.runner import Runner
from mergecli.progress import Progress


@dataclass
class FolderRun:
    """One run into a folder: the target, the temporary folder being written, the runner and
    when the run started."""

    output: Path
    folder: Path
    runner: Runner
    started: float
    started_at: str

    @property
    def wall(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


@contextlib.contextmanager
def folder_run(
    output: str | Path,
    force: bool = False,
    wait: bool = False,
    needed_bytes: int = 0,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Iterator[FolderRun]:
    """Run into ``output`` (resolved; replaced only with ``force``; ``wait`` for a run that
    holds its lock instead of failing; ``needed_bytes`` must fit on its file system)."""
    target = Path(output).resolve()
    check_output(target, force)
    runner = runner or Runner(progress)
    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    try:
        with atomic_folder(target, force, wait, needed_bytes) as folder:
            yield FolderRun(target, folder, runner, started, started_at)
    finally:
        runner.progress.stop()
