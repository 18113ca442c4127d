"""Progress reporting for long work: a rich bar on terminals, nothing elsewhere."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBar


class Progress(Protocol):
    def start(self, phase: str, tensors: int, nbytes: int) -> None: ...
    def advance(self, tensors: int, nbytes: int) -> None: ...
    def stop(self) -> None: ...


class NullProgress:
    """Reports nothing (library default, --quiet, not a terminal)."""

    def start(self, phase: str, tensors: int, nbytes: int) -> None:
        pass

    def advance(self, tensors: int, nbytes: int) -> None:
        pass

    def stop(self) -> None:
        pass


class BarProgress:
    """A rich bar per phase: tensors done, bytes read and throughput."""

    def __init__(self, console: Console) -> None:
        self.bar = RichBar(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.tensors = 0
        self.total_tensors = 0

    def start(self, phase: str, tensors: int, nbytes: int) -> None:
        if self.task is None:
            self.bar.start()
        self.tensors, self.total_tensors = 0, tensors
        self.task = self.bar.add_task(phase, total=nbytes, tensors=f"0/{tensors}")

    def advance(self, tensors: int, nbytes: int) -> None:
        assert self.task is not None
        self.tensors += tensors
        self.bar.update(self.task, advance=nbytes, tensors=f"{self.tensors}/{self.total_tensors}")

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()


def progress_for(console: Console, quiet: bool) -> Progress:
    """A bar when the console is an interactive terminal and not quiet, else nothing."""
    return NullProgress() if quiet or not console.is_terminal else BarProgress(console)


class CountBar:
    """Rich bars that count items (examples, candidate merges) rather than bytes.

    Several bars can show at once (a sweep's points above the current evaluation); a disabled
    CountBar reports nothing.
    """

    def __init__(self, console: Console | None = None, enabled: bool = False) -> None:
        self.bar = (
            RichBar(
                TextColumn("{task.description:<30}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if enabled
            else None
        )
        self.open = 0

    def add(self, description: str, total: int) -> TaskID | None:
        """A new bar; its id for ``advance`` and ``done``."""
        if self.bar is None:
            return None
        if self.open == 0:
            self.bar.start()
        self.open += 1
        return self.bar.add_task(description, total=total)

    def advance(self, task: TaskID | None, count: int = 1, description: str | None = None) -> None:
        if self.bar is not None and task is not None:
            self.bar.update(task, advance=count, description=description)

    def done(self, task: TaskID | None) -> None:
        """Remove a finished bar (the display stops with the last one)."""
        if self.bar is None or task is None:
            return
        self.bar.remove_task(task)
        self.open -= 1
        if self.open == 0:
            self.bar.stop()


def count_bar_for(console: Console, quiet: bool) -> CountBar:
    """Counting bars when the console is an interactive terminal and not quiet."""
    return CountBar(console, not quiet and console.is_terminal)
