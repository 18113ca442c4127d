"""Scratch folders in the system's temporary directory (a merge scored from a folder, an
exported task): named after the host and process that made them, so a later one removes those
whose process died (kill -9, a Ray worker lost mid-evaluation)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergecli.engine.output import process_alive

SCRATCH = re.compile(r"^mergecli-(?P<kind>[a-z]+)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
"""``mergecli-<kind>-<host>-<pid>-<random>``: the host and PID of the process that owns it."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def stale_scratch(root: Path | None = None) -> list[Path]:
    """Scratch folders in ``root`` (the temporary directory) whose process on this host is gone
    (folders of other hosts, on a shared directory, are left alone)."""
    root = Path(root or tempfile.gettempdir())
    host = _host()
    stale = []
    for path in sorted(root.glob("mergecli-*-*")):
        match = SCRATCH.match(path.name)
        if not match or match["host"] != host or not path.is_dir():
            continue
        if not process_alive(int(match["pid"])):
            stale.append(path)
    return stale


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove ``stale_scratch(root)``; returns what was removed."""
    stale = stale_scratch(root)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextmanager
def scratch_folder(kind: str) -> Iterator[Path]:
    """A new empty folder, removed on exit; first removes the stale ones of dead processes."""
    remove_stale_scratch()
    folder = Path(tempfile.mkdtemp(prefix=f"mergecli-{kind}-{_host()}-{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
