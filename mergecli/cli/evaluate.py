"""Commands `evaluate`, `sweep` and `analyze landscape`: merging driven by scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import mergecli
from mergecli.cli import (
    AddressOpt,
    DeviceOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    RecipeArg,
    app,
    err,
    handle_errors,
    out,
    output_folder,
    print_json,
)
from mergecli.cli.analyze import analyze_app, show
from mergecli.distributed.executor import executor_for
from mergecli.errors import RecipeError
from mergecli.progress import count_bar_for


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _scorer(
    recipe: Path, device: str, quiet: bool, executor: str, address: str | None
) -> tuple[mergecli.Recipe, Any]:
    from mergecli.evaluate import Scorer

    spec = mergecli.load_recipe(recipe)
    runner = executor_for(executor, address)
    return spec, Scorer(spec, device, count_bar_for(err, quiet), runner)


def _describe(protocol: dict[str, str]) -> str:
    from mergecli.evaluate.protocol import describe

    return describe(protocol)


def _target(recipe: Path, spec: mergecli.Recipe, output: Path | None, force: bool) -> Path:
    """The output folder (checked before any work is done)."""
    from mergecli.engine.output import check_output

    target = output_folder(recipe, spec, output, False)
    assert target is not None
    target = target.resolve()
    check_output(target, force)
    return target


def score_table(title: str, tasks: list[str], rows: list[tuple[str, dict[str, float]]]) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for task in [*tasks, "mean"]:
        table.add_column(task, justify="right")
    for label, scores in rows:
        values = [scores[t] for t in tasks]
        table.add_row(label, *(_fmt(v) for v in values), _fmt(sum(values) / len(values)))
    return table


@app.command()
@handle_errors
def evaluate(
    recipe: RecipeArg,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model", help="Score this checkpoint or artifact folder instead (repeatable)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the scores as JSON here.")
    ] = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score the recipe's merge (in memory where the evaluator allows) or given checkpoints."""
    from mergecli.evaluate.table import evaluation_table

    spec, scorer = _scorer(recipe, device, quiet or json_out, executor, address)
    data = evaluation_table(scorer, spec, model, output)
    rows = data["rows"]
    if json_out:
        print_json(data)
    elif not quiet:
        title = f"{scorer.metric} ({'higher' if scorer.higher_is_better else 'lower'} is better)"
        show(
            score_table(
                title, [t.name for t in scorer.tasks], [(r["model"], r["tasks"]) for r in rows]
            )
        )


@app.command()
@handle_errors
def sweep(
    recipe: RecipeArg,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="KEY=start:stop:step or KEY=v1,v2 (repeatable; NAME.KEY "
            "for one expert's parameter).",
        ),
    ] = None,
    patience: Annotated[
        int | None, typer.Option("--patience", help="Stop after N points without a new best.")
    ] = None,
    over_checkpoints: Annotated[
        bool,
        typer.Option(
            "--over-checkpoints",
            help="Experts are runs with checkpoint-<step> "
            "folders: merge at each training duration.",
        ),
    ] = False,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Durations by 'tstar' (multiples of each expert's "
            "minimum-validation-loss step) or by 'step'.",
        ),
    ] = "tstar",
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="With --over-checkpoints: run once per seed ({seed} in the recipe's paths) "
            "and report mean ± std.",
        ),
    ] = None,
    stop_patience: Annotated[
        int | None,
        typer.Option(
            "--stop-patience",
            help="With --over-checkpoints: also merge each run's early-stopped checkpoint "
            "(stop after P checkpoints without a better validation score).",
        ),
    ] = None,
    multiples: Annotated[
        str, typer.Option("--multiples", help="Multiples of T* (list or start:stop:step).")
    ] = "0.25,0.5,0.75,1,1.5,2,3,5",
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods to compare, moe for the recipe's mixture of experts "
            "(default: the recipe's).",
        ),
    ] = None,
    output: OutputOpt = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score merges over a parameter grid (writing the best) or over training durations."""
    from mergecli.sweep.grid import parse_grid, parse_values

    if not grid and not over_checkpoints:
        raise RecipeError(
            "sweep: give --grid KEY=VALUES, --over-checkpoints, or both", key="--grid"
        )
    if over_checkpoints:
        from mergecli.sweep.durations import sweep_training
        from mergecli.sweep.grid import parse_axes

        spec = mergecli.load_recipe(recipe)
        target = _target(recipe, spec, output, force)
        result = sweep_training(
            spec,
            device,
            count_bar_for(err, quiet or json_out),
            by,
            [m.strip() for m in methods.split(",")] if methods else None,
            [float(v) for v in parse_values(multiples, "--multiples")],
            parse_axes(grid, spec) if grid else None,
            stop_patience,
            [int(v) for v in parse_values(seeds, "--seeds")] if seeds is not None else None,
            executor_for(executor, address),
        )
        _durations(result, target, json_out, quiet, force)
        return
    if seeds is not None:
        raise RecipeError(
            "--seeds: aggregates duration sweeps; add --over-checkpoints", key="--seeds"
        )
    if stop_patience is not None:
        raise RecipeError(
            "--stop-patience: selects checkpoints of runs; add --over-checkpoints",
            key="--stop-patience",
        )
    spec, scorer = _scorer(recipe, device, quiet or json_out, executor, address)
    assert grid is not None
    axes = parse_grid(grid, spec)
    target = _target(recipe, spec, output, force)
    from mergecli.sweep.run import sweep as run_sweep

    table = run_sweep(spec, axes, scorer, target, force, patience, device)
    if json_out:
        print_json(table)
    elif not quiet:
        print_grid(table)
        test = f", test {_fmt(table['test']['score'])}" if "test" in table else ""
        out.print(
            f"best {table['best']['parameters']} → validation {_fmt(table['best']['score'])}"
            f"{test} ({_describe(table['protocol'])}); "
            f"wrote {table['output']} and {', '.join(Path(f).name for f in table['files'])}",
            highlight=False,
        )


def print_grid(table: dict[str, Any]) -> None:
    arrow = "higher" if table["higher_is_better"] else "lower"
    title = (
        f"sweep of {table['method']}: {table['metric']} ({arrow} is better), "
        f"{table['evaluated']} of {table['points']} points"
        + (" (stopped early)" if table["stopped_early"] else "")
        + ", validation data"
    )
    grid = Table(title=title)
    for label in table["grid"]:
        grid.add_column(label, justify="right")
    for task in [*table["tasks"], "mean"]:
        grid.add_column(task, justify="right")
    for row in table["rows"]:
        style = "bold green" if row == table["best"] else None
        grid.add_row(
            *(_fmt(row["parameters"][k]) for k in table["grid"]),
            *(_fmt(row["tasks"][t]) for t in table["tasks"]),
            _fmt(row["score"]),
            style=style,
        )
    show(grid)


def _durations(
    result: dict[str, Any], target: Path, json_out: bool, quiet: bool, force: bool
) -> None:
    from mergecli.sweep.plots import durations_figure
    from mergecli.sweep.results import write_results

    write_results(result, target, force, "durations", durations_figure)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    by_tstar = result["by"] == "tstar"
    tested = result["protocol"]["reported_on"] == "test"
    table = Table(
        title=f"merged {result['metric']} against training duration "
        f"({'multiples of T*' if by_tstar else 'steps'}); {_describe(result['protocol'])}"
    )
    table.add_column("× T*" if by_tstar else "step", justify="right")
    table.add_column("checkpoints")
    for method in result["methods"]:
        table.add_column(method, justify="right")
    table.add_column("experts", justify="right")
    expert_key = "expert_test_score" if tested else "expert_score"
    std = result.get("std")
    rows = [
        (_fmt(p["x"]), p, std["points"][i] if std else None) for i, p in enumerate(result["points"])
    ]
    if "early_stop" in result:
        label = f"early stop (P={result['early_stop']['patience']})"
        rows.append((label, result["early_stop"], std["early_stop"] if std else None))
    for label, point, spread in rows:
        table.add_row(
            label,
            ", ".join(
                f"{n}@{_fmt(s)}"
                for n, s in zip(result["experts"], point["steps"], strict=True)
                if s is not None
            ),
            *(
                _duration_cell(
                    point["methods"][m], tested, spread["methods"][m] if spread else None
                )
                for m in result["methods"]
            ),
            _pm(point[expert_key], spread[expert_key] if spread else None),
        )
    show(table)
    if std:
        out.print(
            f"mean ± std over seeds {', '.join(map(str, result['seeds']))} (sample std)",
            highlight=False,
        )
    if by_tstar:
        out.print(
            "T* (minimum validation loss): "
            + ", ".join(f"{n} step {s}" for n, s in result["tstar"].items()),
            highlight=False,
        )
    out.print(f"wrote {', '.join(result['files'])}", highlight=False)


def _pm(value: Any, std: Any) -> str:
    """A value, ± its std over seeds when there is one; – for none."""
    if value is None:
        return "–"
    return f"{_fmt(value)} ± {_fmt(std)}" if isinstance(std, float) else _fmt(value)


def _duration_cell(entry: dict[str, Any], tested: bool, spread: dict[str, Any] | None) -> str:
    """The reported score of one method at one duration (± std over seeds), with the
    parameters chosen there."""
    key = ("test", "score") if tested else ("score",)
    score = _pm(_at(entry, key), _at(spread, key) if spread else None)
    chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.get("parameters", {}).items())
    return f"{score} ({chosen})" if chosen else score


def _at(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        data = data[key]
    return data


@analyze_app.command()
@handle_errors
def landscape(
    recipe: RecipeArg,
    models: Annotated[
        list[str],
        typer.Option(
            "--models",
            help="Models on the path: recipe names or folders "
            "(--models A --models B, or --models A,B).",
        ),
    ],
    path: Annotated[
        str,
        typer.Option(
            "--path",
            help="linear: (1−α)θA + αθB; task_arithmetic: θ0 + α·Στ; ties: θ0 + α·τ_TIES.",
        ),
    ] = "linear",
    alphas: Annotated[str, typer.Option("--alphas", help="α grid (start:stop:step or list).")] = (
        "0:1:0.1"
    ),
    metric: Annotated[
        str | None, typer.Option("--metric", help="Built-in metric (default loss).")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Tasks to measure (default: the models').")
    ] = None,
    output: OutputOpt = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Loss along the interpolation path between models, its barrier and a plot."""
    from mergecli.evaluate import Scorer
    from mergecli.sweep.grid import parse_values
    from mergecli.sweep.landscape import landscape as run_landscape
    from mergecli.sweep.landscape import landscape_recipe
    from mergecli.sweep.plots import landscape_figure
    from mergecli.sweep.results import write_results

    spec = landscape_recipe(mergecli.load_recipe(recipe), metric, str(recipe))
    names = [n.strip() for value in models for n in value.split(",") if n.strip()]
    values = [float(a) for a in parse_values(alphas, "--alphas")]
    target = _target(recipe, spec, output, force) if output else None
    scorer = Scorer(
        spec, device, count_bar_for(err, quiet or json_out), executor_for(executor, address)
    )
    result = run_landscape(spec, scorer, names, path, values, task)
    if target is not None:
        write_results(result, target, force, "landscape", landscape_figure)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    table = Table(title=f"{result['metric']} along {result['path_formula']}", min_width=60)
    table.add_column("α", justify="right")
    for name in [*result["tasks"], "mean"]:
        table.add_column(name, justify="right")
    for i, alpha in enumerate(result["alphas"]):
        table.add_row(
            _fmt(alpha), *(_fmt(c[i]) for c in result["tasks"].values()), _fmt(result["mean"][i])
        )
    show(table)
    ends = (
        "mean of the ends minus the lowest score on the path"
        if result["higher_is_better"]
        else "highest loss on the path minus the mean of the ends"
    )
    out.print(
        f"barrier {_fmt(result['barrier'])} ({ends}); per task: "
        + ", ".join(f"{n} {_fmt(b)}" for n, b in result["task_barriers"].items()),
        highlight=False,
    )
    out.print(
        f"chord barrier {_fmt(result['chord_barrier'])} (largest gap between the path and the "
        "straight line joining its ends); per task: "
        + ", ".join(f"{n} {_fmt(b)}" for n, b in result["task_chord_barriers"].items()),
        highlight=False,
    )
    for file in result.get("files", []):
        out.print(f"wrote {file}", highlight=False)
