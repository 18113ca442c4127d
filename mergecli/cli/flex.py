"""Command `flex`: FlexMerge into one artifact per target size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import mergecli
from mergecli.cli import (
    AddressOpt,
    DeviceOpt,
    DryRunOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
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


def parse_sizes(size: float | None, sizes: str | None) -> list[float] | None:
    """--size or --sizes (comma-separated) as a list; None when neither is given."""
    if size is not None and sizes is not None:
        raise RecipeError("--size and --sizes: give one of them", key="--size")
    if size is not None:
        return [size]
    if sizes is None:
        return None
    try:
        return [float(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(
            f"--sizes: '{sizes}' is not a comma-separated list of numbers", key="--sizes"
        ) from None


@app.command()
@handle_errors
def flex(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (default: recipe.yaml here).")] = Path(
        "recipe.yaml"
    ),
    size: Annotated[
        float | None, typer.Option("--size", help="Target size in models (e.g. 2.5).")
    ] = None,
    sizes: Annotated[
        str | None, typer.Option("--sizes", help="Several target sizes: 1,1.5,2,3.")
    ] = None,
    output: OutputOpt = None,
    granularity: Annotated[
        str | None,
        typer.Option("--granularity", help="component, layer, tensor or patterns (a,b,...)."),
    ] = None,
    linkage: Annotated[
        str | None, typer.Option("--linkage", help="min, max, avg, merged or random.")
    ] = None,
    order: Annotated[
        str | None, typer.Option("--order", help="greedy, left_to_right or right_to_left.")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="flexmerge or channel (the baseline).")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Merging method (overrides merge_method).")
    ] = None,
    heads: Annotated[
        str | None,
        typer.Option(
            "--heads",
            help="Task-specific heads (regular expressions a,b,...): kept per task, not merged, "
            "left out of the size.",
        ),
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate",
            help="Score every task's model at each size with the recipe's evaluate: section; "
            "plot score against deployed size.",
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    shard_size: ShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge the recipe's experts into artifacts of the given sizes (1 to M models)."""
    from mergecli.distributed.flex import similarity_on_ray
    from mergecli.evaluate import Scorer
    from mergecli.flex import plan_flex, run_flex
    from mergecli.flex.report import result_summary
    from mergecli.sweep.sizes import score_flex

    spec = mergecli.load_recipe(recipe)
    if method is not None:
        spec.merge_method = method
    patterns = granularity.split(",") if granularity and "," in granularity else None
    known = granularity in (None, "component", "layer", "tensor")
    overrides: dict[str, Any] = {
        "sizes": parse_sizes(size, sizes),
        "granularity": patterns or (granularity if known else [granularity]),
        "linkage": linkage,
        "order": order,
        "strategy": strategy,
        "heads": heads.split(",") if heads else None,
    }
    target = output_folder(recipe, spec, output, dry_run)
    plan = plan_flex(spec, overrides, device=device, shard_size=shard_size)
    print_warnings(plan.merge.warnings)
    if dry_run:
        summary = plan.summary()
        if json_out:
            print_json(summary)
        elif not quiet:
            print_summary(summary)
        return
    assert target is not None
    runner = executor_for(executor, address)
    similarity = (
        similarity_on_ray(runner, spec, overrides, device, shard_size)
        if isinstance(runner, RayExecutor)
        else None
    )
    bar = count_bar_for(err, quiet or json_out)
    scorer = Scorer(spec, device, bar, runner) if evaluate else None
    progress = progress_for(err, quiet)
    result = run_flex(
        plan, target, force=force, progress=progress, similarity=similarity, wait=wait
    )
    summary = result_summary(result)
    if scorer is not None:
        summary["evaluation"] = score_flex(spec, scorer, result)
    if json_out:
        print_json(summary)
    elif not quiet:
        print_result(summary)
        if scorer is not None:
            print_scores(summary["evaluation"])


def print_scores(scores: dict[str, Any]) -> None:
    from mergecli.cli.analyze import show

    tested = "experts_test" in scores
    split = "test" if tested else "validation"
    table = Table(
        title=f"{scores['metric']} of each task's model against deployed size ({split} data)"
    )
    table.add_column("size", justify="right")
    for task in [*scores["tasks"], "mean"]:
        table.add_column(task, justify="right")
    rows = [
        (
            f"{r['size']:.3f}",
            *((r["test"]["tasks"], r["test"]["score"]) if tested else (r["tasks"], r["score"])),
        )
        for r in scores["sizes"]
    ]
    expert_score = scores["expert_test_score"] if tested else scores["expert_score"]
    if expert_score is not None:
        rows.append(("experts", scores["experts_test" if tested else "experts"], expert_score))
    for label, tasks, mean in rows:
        table.add_row(
            label, *(f"{tasks.get(t, float('nan')):.4g}" for t in scores["tasks"]), f"{mean:.4g}"
        )
    show(table)
    gain = scores.get("test_gain_1x_2x" if tested else "gain_1x_2x")
    if gain is not None:
        out.print(f"1× → 2×: {gain:+.4g} ({scores['metric']}, {split} data)", highlight=False)
    out.print(f"wrote {', '.join(scores['files'])}", highlight=False)


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="flex plan", show_header=False)
    for key, value in summary.items():
        if key == "warnings":
            continue
        if key.endswith("bytes") or key == "bytes_per_pass":
            value = human_bytes(value)
        elif isinstance(value, list):
            value = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


ORDER_ROWS = 20
"""Merge steps printed (the whole order is in each size's flex_report.json)."""


def print_result(summary: dict[str, Any]) -> None:
    order = summary["merge_order"]
    if order:
        steps = Table(title=f"merge order (first {min(ORDER_ROWS, len(order))} of {len(order)})")
        for column in ("step", "block", "group a", "group b", "similarity", "size after"):
            steps.add_column(column)
        for row in order[:ORDER_ROWS]:
            steps.add_row(
                str(row["step"]),
                row["block"],
                ",".join(row["a"]),
                ",".join(row["b"]),
                f"{row['similarity']:.4f}",
                f"{row['size_after']:.4f}",
            )
        out.print(steps)
    table = Table(title="FlexMerge sizes")
    for column in ("target", "size", "stored", "steps", "folder"):
        table.add_column(column)
    for row in summary["sizes"]:
        table.add_row(
            f"{row['target']:g}",
            f"{row['size']:.4f}",
            human_bytes(row["stored_bytes"]),
            "–" if row["steps_applied"] is None else str(row["steps_applied"]),
            row["folder"],
        )
    out.print(table)
    out.print(
        f"done in {summary['timing']['wall_s']:.2f} s; 'mergecli export FOLDER --task NAME "
        "--output DIR' writes one task's checkpoint; flex_report.json/png in each folder",
        highlight=False,
    )
