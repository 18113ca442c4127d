"""The output folder: written beside the target under a lock, renamed into place only when
complete.

A run that writes ``out/`` holds an advisory lock (``.out.mergecli-lock`` beside it, holding
the writer's PID) from the first check to the final rename, so a second run into the same
target fails at once (or waits). Its work goes into ``.out.mergecli-tmp-PID``; the folders of
runs that died (kill -9, power loss) are removed by the next run on that target, or listed and
removed by ``mergecli cleanup``. Operating-system errors on the output (read-only, no space,
permission) become one-line ``OutputError``s naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergecli.errors import OutputError
from mergecli.sources import CONFIG_FILES, TOKENIZER_FILES

if TYPE_CHECKING:
    import torch

    from mergecli.vocab import Vocabulary

LOCK = ".{name}.mergecli-lock"
WORK = re.compile(r"^\.(?P<name>.+)\.mergecli-(?:tmp|old)-(?P<pid>\d+)$")
"""The temporary (``tmp``) and replaced (``old``) folders of a run, beside its target."""
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Errors that only writing raises: mapped even when the error names no file."""
OUTPUT_ERRNOS = WRITE_ERRNOS | {errno.EACCES, errno.EPERM}
"""Errors mapped when they name the output's folder or a file in it."""


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output unless force (checked before any tensor is read)."""
    if output.exists() and not force:
        raise OutputError(f"output '{output}' exists; use --force to replace it", output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a folder", output)


def lock_file(output: Path) -> Path:
    return output.parent / LOCK.format(name=output.name)


@contextlib.contextmanager
def output_lock(output: Path, wait: bool = False) -> Iterator[None]:
    """Hold the target's advisory lock; a second holder fails at once naming the running
    process, or blocks until it ends with ``wait``. The lock file is removed on release."""
    path = lock_file(output)
    with output_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with output_errors(path):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            holder = _read_pid(path)
            raise OutputError(
                f"output '{output}' is being written by another mergecli run "
                f"(pid {holder or '?'}); wait for it to end, or pass --wait",
                output,
            ) from None
        # the holder before us may have removed the file we opened: lock the current one
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_by_other(output: Path) -> bool:
    """Whether a live run holds ``output``'s lock (tested without taking it for long)."""
    path = lock_file(output)
    if not path.exists():
        return False
    try:
        with output_lock(output):
            return False
    except OutputError:
        return True


def stale_folders(folder: Path) -> list[Path]:
    """Temporary folders in ``folder`` left by runs that are no longer running."""
    if not folder.is_dir():
        return []
    stale = []
    for path in sorted(folder.iterdir()):
        match = WORK.match(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or (process_alive(pid) and _locked_by_other(folder / match["name"])):
            continue
        stale.append(path)
    return stale


def remove_stale(output: Path) -> list[Path]:
    """Remove the temporary folders of ``output`` (call while holding its lock: none can be
    in use); returns what was removed."""
    removed = []
    for path in output.parent.glob(f".{glob_escape(output.name)}.mergecli-*-*"):
        match = WORK.match(path.name)
        if match and match["name"] == output.name and path.is_dir():
            with output_errors(path):
                shutil.rmtree(path)
            removed.append(path)
    return removed


def remove_stale_in(folder: Path) -> list[Path]:
    """Remove the temporary folders in ``folder`` of runs that are no longer running."""
    stale = stale_folders(folder)
    for path in stale:
        with output_errors(path):
            shutil.rmtree(path)
    return stale


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_space(output: Path, needed: int) -> None:
    """One line naming the folder, the bytes needed and those available when they fall short."""
    if needed <= 0:
        return
    free = shutil.disk_usage(output.parent).free
    if free < needed:
        raise OutputError(
            f"output '{output}': needs {needed} bytes, only {free} are free on its file system "
            f"({output.parent})",
            output,
        )


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn an operating-system error on ``path`` or below it (no space, read-only, permission)
    into an OutputError naming the file; other errors (an input's) pass through."""
    try:
        yield
    except OSError as exc:
        name = exc.filename
        ours = name is None or Path(name) == path.parent or Path(name).is_relative_to(path)
        if exc.errno not in (WRITE_ERRNOS if name is None else OUTPUT_ERRNOS) or not ours:
            raise
        where = name or path
        raise OutputError(f"cannot write '{where}': {exc.strerror or exc}", where) from None


@contextlib.contextmanager
def atomic_folder(
    output: Path, force: bool, wait: bool = False, needed_bytes: int = 0
) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it replaces ``output``.

    Holds the target's lock throughout, removes the temporary folders of dead runs first and
    checks that ``needed_bytes`` fit. On any error (or signal) the temporary folder is removed
    and an existing output is left untouched.
    """
    with output_lock(output, wait):
        check_output(output, force)
        remove_stale(output)
        check_space(output, needed_bytes)
        tmp = output.parent / f".{output.name}.mergecli-tmp-{os.getpid()}"
        try:
            with output_errors(tmp):
                tmp.mkdir()
                yield tmp
                old = output.parent / f".{output.name}.mergecli-old-{os.getpid()}"
                if output.exists():
                    output.rename(old)
                tmp.rename(output)
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def copy_model_files(
    source: Path,
    tokenizer_source: Path,
    folder: Path,
    out_dtype: torch.dtype,
    config_updates: dict[str, Any] | None = None,
    vocabulary: Vocabulary | None = None,
) -> None:
    """config.json (dtype updated, then ``config_updates`` set), generation config and
    tokenizer files; with a new ``vocabulary``, its tokenizer and its row count as the config's
    vocab_size."""
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    config_file = folder / "config.json"
    if config_file.is_file():
        config: dict[str, Any] = json.loads(config_file.read_text())
        dtype = str(out_dtype).removeprefix("torch.")
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        config.update(config_updates or {})
        if vocabulary is not None:
            nested = "vocab_size" not in config and "vocab_size" in config.get("text_config", {})
            (config["text_config"] if nested else config)["vocab_size"] = vocabulary.rows
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if vocabulary is not None:
        vocabulary.save(folder)
        return
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, folder / name)
