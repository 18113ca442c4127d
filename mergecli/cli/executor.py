"""The --executor and --address options of the commands that can run work on Ray."""

from __future__ import annotations

from typing import Annotated

import typer

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
