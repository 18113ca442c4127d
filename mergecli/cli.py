"""The command line: parses, calls the library, prints. Nothing else lives here."""

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
from rich.table import Table

import mergecli
from mergecli.errors import MergeError
from mergecli.progress import progress_for
from mergecli.report import human_bytes

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


@app.command()
@handle_errors
def merge(
    recipe: RecipeArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (overrides the recipe).")
    ] = None,
    device: DeviceOpt = "cpu",
    shard_size: ShardOpt = "5GB",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; read no tensor.")
    ] = False,
    allow_bin: Annotated[
        bool, typer.Option("--allow-bin", help="Accept pickle .bin weights (weights_only).")
    ] = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge the checkpoints a recipe names into a new model folder."""
    spec = mergecli.load_recipe(recipe)
    if allow_bin:
        spec.allow_bin = True
    target = output or (spec.resolve_path(spec.output) if spec.output else None)
    if target is None and not dry_run:
        raise MergeError(f"{recipe}: no output folder: set 'output' in the recipe or --output")
    plan = mergecli.plan_merge(spec, device=device, shard_size=shard_size)
    print_warnings(plan.warnings)
    if dry_run:
        summary = plan.summary()
        if json_out:
            print_json(summary)
        else:
            print_plan(summary)
        return
    assert target is not None
    result = mergecli.run_merge(plan, target, force=force, progress=progress_for(err, quiet))
    report = result.report
    summary = {
        key: report[key]
        for key in (
            "output",
            "method",
            "totals",
            "timing",
            "bytes_read",
            "bytes_written",
            "peak_rss_bytes",
            "device",
        )
    }
    if json_out:
        print_json(summary)
    elif not quiet:
        t = report["timing"]
        out.print(
            f"merged {report['plan']['tensors']} tensors with {report['method']} into "
            f"{report['output']} in {t['wall_s']:.2f} s "
            f"(read {human_bytes(report['bytes_read'])}, wrote "
            f"{human_bytes(report['bytes_written'])}, peak memory "
            f"{human_bytes(report['peak_rss_bytes'])})",
            highlight=False,
        )


def print_plan(summary: dict[str, Any]) -> None:
    table = Table(title="merge plan", show_header=False)
    for key, value in summary.items():
        if key == "warnings":
            continue
        if key.startswith("bytes") or key == "peak_memory_estimate":
            value = human_bytes(value)
        elif isinstance(value, list):
            value = "\n".join(map(str, value))
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@app.command()
@handle_errors
def methods(json_out: JsonOpt = False) -> None:
    """List every merging method with its parameters, defaults and definition."""
    rows = []
    for spec in mergecli.list_methods():
        rows.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "base": spec.base,
                "parameters": [
                    {
                        "name": p.name,
                        "default": None if p.required else p.default,
                        "required": p.required,
                        "per_model": p.per_model,
                        "choices": p.choices,
                        "help": p.help,
                    }
                    for p in spec.params
                ],
                "convention": spec.convention,
            }
        )
    if json_out:
        print_json(rows)
        return
    table = Table(title="merging methods", show_lines=True)
    for column in ("method", "definition", "parameters (default)", "convention"):
        table.add_column(column)
    for row in rows:
        params = "\n".join(
            f"{p['name']}{' (per model)' if p['per_model'] else ''} = "
            f"{'required' if p['required'] else p['default']}"
            for p in row["parameters"]
        )
        table.add_row(row["name"], row["summary"], params or "–", row["convention"] or "–")
    out.print(table)


@app.command()
@handle_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="A FlexMerge, EMR or TALL artifact folder.")],
    task: Annotated[str, typer.Option("--task", help="The task to reconstruct.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    shard_size: ShardOpt = "5GB",
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write one task of an artifact as a standard checkpoint that from_pretrained loads."""
    from mergecli.artifacts import open_artifact
    from mergecli.artifacts.export import export_task

    opened = open_artifact(artifact)
    folder = export_task(
        opened, task, output, force=force, shard_size=shard_size, progress=progress_for(err, quiet)
    )
    if json_out:
        print_json({"artifact": str(artifact), "task": task, "output": str(folder)})
    elif not quiet:
        out.print(f"exported task {task} to {folder}", highlight=False)


def main() -> None:
    app()
