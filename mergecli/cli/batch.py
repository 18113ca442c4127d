"""Command `batch`: several named recipes in one file, in dependency order, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergecli.cli import (
    AddressOpt,
    DeviceOpt,
    DryRunOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    ShardOpt,
    WaitOpt,
    app,
    err,
    handle_errors,
    out,
    print_json,
)
from mergecli.distributed.executor import executor_for


@app.command()
@handle_errors
def batch(
    file: Annotated[Path, typer.Argument(help="YAML file of named recipes ('---' between them).")],
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            "-I",
            help="Folder of outputs of recipes without 'output' (default: "
            "the batch file's folder).",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output of the recipe without a name.")
    ] = None,
    device: DeviceOpt = "cpu",
    shard_size: ShardOpt = "5GB",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run several recipes, one using another's output by name; finished ones are skipped."""
    from mergecli.batch import BatchDisplay, RunOptions, load_batch, run_batch
    from mergecli.batch.run import preview

    spec = load_batch(file, work_dir, output)
    options = RunOptions(device, shard_size, force, wait)
    if dry_run:
        rows = preview(spec, options)
        if json_out:
            print_json({"batch": str(file), "recipes": rows})
            return
        table = Table(title=f"batch {file}")
        for column in ("recipe", "method", "needs", "output", "action"):
            table.add_column(column)
        for row in rows:
            action = row["action"] + (f": {row['error']}" if "error" in row else "")
            needs = ", ".join(row["needs"]) or "–"
            table.add_row(row["name"], row["method"], needs, row["output"], action)
        out.print(table)
        return
    show = not (quiet or json_out) and err.is_terminal
    runner = executor_for(executor, address)
    result = run_batch(spec, options, runner, BatchDisplay(err if show else None))
    for outcome in result.outcomes:
        if outcome.error:
            err.print(
                f"[bold red]{outcome.status}:[/] {outcome.name}: {outcome.error}", highlight=False
            )
    if json_out:
        print_json({"batch": str(file), **result.summary()})
    elif not quiet:
        table = Table(title=f"batch {file}")
        for column in ("recipe", "status", "seconds", "where", "output"):
            table.add_column(column)
        for o in result.outcomes:
            where = o.where.get("host", "")
            table.add_row(o.name, o.status, f"{o.seconds:.2f}", where, o.output)
        out.print(table)
    result.check()
