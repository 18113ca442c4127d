"""The --executor and --address options shared by the commands that can run on Ray."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer

from mergecli.distributed.executor import LocalExecutor, RayExecutor, executor_for

ExecutorOpt = Annotated[
    str,
    typer.Option("--executor", help="local, or ray: independent work as tasks on a Ray cluster."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster to join (host:port or auto; default: start one here)."
    ),
]


@contextlib.contextmanager
def open_executor(name: str, address: str | None) -> Iterator[LocalExecutor | RayExecutor]:
    """The executor, closed (its Ray tasks cancelled, a cluster it started stopped) on exit."""
    executor = executor_for(name, address)
    try:
        yield executor
    finally:
        executor.close()
