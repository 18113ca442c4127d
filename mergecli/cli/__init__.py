"""The command line: parses, calls the library, prints. Nothing else lives here.

Each feature's commands live in a module of this package and register on ``app``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

import mergecli
from mergecli.errors import MergeError, RecipeError

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
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
ShardOpt = Annotated[str, typer.Option("--shard-size", help="Largest output shard (5GB, 500MB).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; read no tensor.")]
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
        except MergeError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("MERGECLI_DEBUG"):
                raise
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                "(set MERGECLI_DEBUG=1 for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


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
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


def main() -> None:
    app()


from mergecli.cli import analyze, evaluate, flex, merge, temporal  # noqa: E402,F401  (command registration)
