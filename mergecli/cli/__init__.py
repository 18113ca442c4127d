"""The command line: parses, calls the library, prints. Nothing else lives here.

Each feature's commands live in a module of this package and register on ``app``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

import mergecli
from mergecli.distributed.executor import ExecutorName
from mergecli.errors import MergeError, RecipeError
from mergecli.jsonsafe import strict_json
from mergecli.recipe import Conventions

app = typer.Typer(
    name="mergecli",
    help="Merge model checkpoints (full fine-tunes and PEFT adapters) with bounded memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="Wait for another run writing the same output, not fail."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
SweepRunsOpt = Annotated[
    bool,
    typer.Option(
        "--over-checkpoints", help="Experts are runs with checkpoint-<step> folders: sweep."
    ),
]
MatchOpt = Annotated[
    str, typer.Option("--match", help="Match checkpoints by 'step' or by 'fraction' of runs.")
]
ShardOpt = Annotated[str, typer.Option("--shard-size", help="Largest output shard (5GB, 500MB).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; read no tensor.")]
ConventionsOpt = Annotated[
    Conventions | None,
    typer.Option(
        "--conventions",
        help="mergecli (the papers', default) or mergekit (mergekit 0.1.5's defaults and "
        "behaviour); overrides the recipe's conventions key.",
    ),
]
ExecutorOpt = Annotated[
    ExecutorName,
    typer.Option("--executor", help="local, or ray: independent work as tasks on a Ray cluster."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster to join (host:port or auto; default: start one here)."
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output folder (overrides the recipe).")
]


def output_folder(recipe: Path, spec: Any, output: Path | None, dry_run: bool) -> Path | None:
    """--output, else the recipe's ``output``; an error when neither is given (unless dry run)."""
    target = output or (spec.resolve_path(spec.output) if spec.output else None)
    if target is None and not dry_run:
        raise RecipeError(
            f"{recipe}: no output folder: set 'output' in the recipe or --output", key="output"
        )
    return target


def handle_errors(fn: F) -> F:
    """Turn MergeError into one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            exit_interrupted(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
        except MergeError as exc:
            if RECEIVED:  # a signal raised inside a method may come back wrapped
                exit_interrupted(RECEIVED[-1])
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            if RECEIVED:  # or as another error, raised inside a C extension's callback
                exit_interrupted(RECEIVED[-1])
            if os.environ.get("MERGECLI_DEBUG"):
                raise
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                "(set MERGECLI_DEBUG=1 for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def exit_interrupted(signum: int) -> NoReturn:
    """One line and exit 128 + the signal's number (Ctrl-C 130, SIGHUP 129, SIGTERM 143)."""
    name = signal.Signals(signum).name
    err.print(f"interrupted ({name}); the output was not written", highlight=False)
    raise typer.Exit(128 + signum) from None


def version_callback(value: bool) -> None:
    if value:
        out.print(f"mergecli {mergecli.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """mergecli: stream-merge checkpoints on CPU or GPU."""


def print_json(data: Any) -> None:
    """Strict JSON on stdout: a non-finite number becomes null, with a warning on stderr."""
    text, notes = strict_json(data)
    print_warnings(notes)
    sys.stdout.write(text + "\n")


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


RECEIVED: list[int] = []
"""The signals this process was sent (Ctrl-C, SIGTERM, SIGHUP), once ``main`` handles them."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C so that the same cleanup runs
    (temporary folder removed, lock released)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    RECEIVED.append(signum)
    if len(RECEIVED) == 1:  # a repeat lands in the cleanup the first one started: let it finish
        raise Interrupted(signum)


def main() -> None:
    """The ``mergecli`` entry point: Ctrl-C, SIGTERM and SIGHUP at any moment give one line and
    exit 130, 143 or 129 (128 + the signal's number)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    try:
        app()
    except KeyboardInterrupt as exc:
        code = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        sys.stderr.write(f"interrupted ({signal.Signals(code).name})\n")
        sys.exit(128 + code)


from mergecli.cli import (  # noqa: E402,F401  (command registration)
    analyze,
    batch,
    evaluate,
    examples,
    flex,
    landscape,
    merge,
    moe,
    temporal,
)
