"""One progress display for a whole batch: recipes done, and the running merge's phase."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichBar

from mergecli.progress import NullProgress, Progress

if TYPE_CHECKING:
    from mergecli.batch.run import Outcome


class BatchDisplay:
    """Reports nothing unless built with a console (a terminal, not --quiet): then one rich
    display with a row for the batch and a row for the phase of the recipe being merged."""

    def __init__(self, console: Console | None = None) -> None:
        self.bar = (
            RichBar(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if console is not None
            else None
        )
        self.batch: TaskID | None = None

    def begin(self, recipes: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.batch = self.bar.add_task("batch", total=recipes)

    def recipe(self, name: str) -> Progress:
        """The progress of one recipe's merge, shown under the batch's row."""
        if self.bar is None or self.batch is None:
            return NullProgress()
        self.bar.update(self.batch, description=f"batch: {name}")
        return _PhaseRow(self.bar)

    def finished(self, outcome: Outcome) -> None:
        if self.bar is not None and self.batch is not None:
            self.bar.update(self.batch, advance=1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _PhaseRow:
    """The merge phases of one recipe, one row at a time (the Progress protocol)."""

    def __init__(self, bar: RichBar) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, phase: str, tensors: int, nbytes: int) -> None:
        self.stop()
        self.task = self.bar.add_task(f"  {phase}", total=nbytes)

    def advance(self, tensors: int, nbytes: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=nbytes)

    def stop(self) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
