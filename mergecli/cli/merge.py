"""Commands `merge`, `methods` and `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import mergecli
from mergecli.cli import (
    AddressOpt,
    ConventionsOpt,
    DeviceOpt,
    DryRunOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    RecipeArg,
    ShardOpt,
    WaitOpt,
    app,
    err,
    handle_errors,
    out,
    output_folder,
    print_json,
    print_warnings,
)
from mergecli.distributed.executor import RayExecutor, executor_for
from mergecli.errors import RecipeError
from mergecli.progress import count_bar_for, progress_for
from mergecli.report import human_bytes


@app.command()
@handle_errors
def merge(
    recipe: RecipeArg,
    output: OutputOpt = None,
    device: DeviceOpt = "cpu",
    shard_size: ShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    allow_bin: Annotated[
        bool, typer.Option("--allow-bin", help="Accept pickle .bin weights (weights_only).")
    ] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    conventions: ConventionsOpt = None,
    report_detail: Annotated[
        str | None,
        typer.Option(
            "--report",
            help="full (default: totals and a row per tensor) or summary (totals only); "
            "overrides the recipe's report key.",
        ),
    ] = None,
) -> None:
    """Merge the checkpoints a recipe names into a new model folder."""
    spec = mergecli.load_recipe(recipe)
    if allow_bin:
        spec.allow_bin = True
    if report_detail is not None:
        if report_detail not in ("full", "summary"):
            raise RecipeError(f"--report: '{report_detail}' is not full or summary", key="report")
        spec.report = report_detail  # type: ignore[assignment]
    if conventions is not None:
        spec.conventions = conventions
    target = output_folder(recipe, spec, output, dry_run)
    runner = None if dry_run else executor_for(executor, address)
    if dry_run:  # headers only: a selecting method's plan lists every expert
        plan = mergecli.plan_merge(spec, device, shard_size, experts_selected=True)
        selection: dict[str, Any] = {}
    else:
        from mergecli.evaluate import plan_with_selection

        bar = count_bar_for(err, quiet or json_out)
        plan, selection = plan_with_selection(spec, device, shard_size, bar, runner)
    print_warnings(plan.warnings)
    printed = len(plan.warnings)
    if dry_run:
        summary = plan.summary()
        if json_out:
            print_json(summary)
        else:
            print_plan(summary)
        return
    assert target is not None
    progress = progress_for(err, quiet)
    if isinstance(runner, RayExecutor):
        from mergecli.distributed.merge import run_merge_on_ray

        result = run_merge_on_ray(plan, target, runner, shard_size, force, progress, wait)
    else:
        result = mergecli.run_merge(plan, target, force=force, progress=progress, wait=wait)
    report = result.report
    print_warnings(plan.warnings[printed:])
    run = report["run"]
    summary = {
        "output": run["output"],
        **{
            key: report[key]
            for key in ("method", "totals", "bytes_read", "bytes_written", "artifact", "lora")
            if key in report
        },
        **{
            key: run[key]
            for key in ("timing", "peak_rss_bytes", "device", "executor")
            if key in run
        },
        "warnings": report["plan"]["warnings"],
    }
    summary.update(selection)
    if json_out:
        print_json(summary)
    elif not quiet:
        if selection:
            soup = selection["greedy_soup"]
            test = f"; test score {selection['test']['score']:.4g}" if "test" in selection else ""
            out.print(
                f"greedy soup kept {', '.join(soup['selected'])} of "
                f"{len(soup['expert_scores'])} experts (chosen on validation data{test})",
                highlight=False,
            )
        t = run["timing"]
        out.print(
            f"merged {report['plan']['tensors']} tensors with {report['method']} into "
            f"{run['output']} in {t['wall_s']:.2f} s "
            f"(read {human_bytes(report['bytes_read'])}, wrote "
            f"{human_bytes(report['bytes_written'])}, peak memory "
            f"{human_bytes(run['peak_rss_bytes'])})",
            highlight=False,
        )
        if "lora" in report:
            lora = report["lora"]
            out.print(
                f"LoRA adapter of {len(lora['modules'])} modules "
                f"({len(lora['modules_to_save'])} saved whole); lowest energy kept "
                f"{lora['min_energy_kept']:.4f}",
                highlight=False,
            )
        if "artifact" in report:
            artifact = report["artifact"]
            out.print(
                f"task-mask artifact of {len(artifact['tasks'])} tasks "
                f"({', '.join(artifact['tasks'])}): {artifact['size_in_models']:.3f} models on "
                f"disk; 'mergecli export {run['output']} --task NAME --output DIR' rebuilds one",
                highlight=False,
            )


def print_plan(summary: dict[str, Any], title: str = "merge plan") -> None:
    table = Table(title=title, show_header=False)
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
    rows: list[dict[str, Any]] = []
    for spec in mergecli.list_methods():
        rows.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "base": spec.base,
                "output": spec.output,
                "min_models": spec.min_models,
                "max_models": spec.max_models,
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
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write one task of an artifact as a standard checkpoint that from_pretrained loads."""
    from mergecli.artifacts import open_artifact
    from mergecli.artifacts.export import export_task

    opened = open_artifact(artifact)
    folder = export_task(
        opened,
        task,
        output,
        force=force,
        shard_size=shard_size,
        progress=progress_for(err, quiet),
        wait=wait,
    )
    if json_out:
        print_json({"artifact": str(artifact), "task": task, "output": str(folder)})
    elif not quiet:
        out.print(f"exported task {task} to {folder}", highlight=False)


@app.command()
@handle_errors
def cleanup(
    folder: Annotated[Path, typer.Argument(help="The folder that holds the outputs.")] = Path("."),
    remove: Annotated[bool, typer.Option("--remove", help="Delete them (default: list).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List (or remove) the temporary folders that interrupted runs left beside their outputs,
    and the scratch folders (in the system's temporary directory) of evaluations that died."""
    from mergecli.engine.output import remove_stale_in, stale_folders
    from mergecli.engine.scratch import remove_stale_scratch, stale_scratch

    if remove:
        found = remove_stale_in(folder) + remove_stale_scratch()
    else:
        found = stale_folders(folder) + stale_scratch()
    verb = "removed" if remove else "stale"
    if json_out:
        print_json({"folder": str(folder), verb: [str(p) for p in found]})
        return
    for path in found:
        out.print(f"{verb}: {path}", highlight=False)
    if not found:
        out.print(f"no temporary folders of interrupted runs in {folder}", highlight=False)
    elif not remove:
        out.print("run 'mergecli cleanup --remove' to delete them", highlight=False)
