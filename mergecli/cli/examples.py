"""Commands `analyze forgetting` and `analyze diwa`: analyses of per-example predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import mergecli
from mergecli.cli import (
    DeviceOpt,
    JsonOpt,
    MatchOpt,
    QuietOpt,
    SweepRunsOpt,
    err,
    handle_errors,
    out,
    print_json,
)
from mergecli.cli.analyze import _fmt, analyze_app, show
from mergecli.progress import count_bar_for

PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write PNG figures into DIR.")]
TestOpt = Annotated[
    bool, typer.Option("--test", help="Read the evaluate section's test_data, not data.")
]
RecipeOpt = Annotated[
    Path, typer.Argument(help="Recipe with experts and an 'evaluate:' section (built-in metric).")
]


def _plots(plot: Path | None, write: Any, result: dict[str, Any]) -> None:
    if plot is None:
        return
    from mergecli.engine.output import output_errors

    with output_errors(plot.resolve()):
        written = write(result, plot)
    result["plots"] = [str(p) for p in (written if isinstance(written, list) else [written])]


@analyze_app.command()
@handle_errors
def forgetting(
    recipe: RecipeOpt,
    early: Annotated[
        list[str],
        typer.Option(
            "--early",
            help="An early checkpoint per task for EL2N, {task} in the path "
            "(runs/{task}/checkpoint-15); repeat once per run to average over runs.",
        ),
    ],
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="The early model of the memorisation metrics, {task} in the path "
            "(default: the first --early); the late model is the task's expert.",
        ),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="Difficulty bins (quantiles).")] = 10,
    test: TestOpt = False,
    plot: PlotOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Examples each expert gets right and the merge forgets, by EL2N difficulty, and the
    memorisation metrics (undertraining §4, App. H)."""
    from mergecli.analyze.example_plots import write_forgetting_plots
    from mergecli.analyze.forgetting import analyze_forgetting

    result = analyze_forgetting(
        mergecli.load_recipe(recipe),
        early,
        compare,
        bins,
        "test" if test else "validation",
        device,
        count_bar_for(err, quiet or json_out),
    )
    _plots(plot, write_forgetting_plots, result)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    mean = result["mean"]
    table = Table(
        title=f"{result['method']} merge: forgetting and memorisation per EL2N bin, mean over "
        f"{len(result['tasks'])} tasks ({result['data']})"
    )
    for column in (
        "bin",
        "forgotten share",
        "forgotten rate",
        "loss share",
        "Δ margin",
        "Δ loss",
        "L1 shift",
    ):
        table.add_column(column, justify="right")
    for row in mean["per_bin"]:
        table.add_row(
            str(row["bin"]),
            *(
                _fmt(row[f])
                for f in (
                    "forgotten_share",
                    "forgotten_rate",
                    "loss_share",
                    "delta_margin",
                    "delta_loss",
                    "shift",
                )
            ),
        )
    show(table)
    tasks = Table(title="per task")
    for column in ("task", "examples", "expert acc", "merged acc", "early acc", "forgotten"):
        tasks.add_column(column, justify="left" if column == "task" else "right")
    for name, task in result["tasks"].items():
        acc = task["accuracy"]
        tasks.add_row(
            name,
            str(task["examples"]),
            _fmt(acc["expert"]),
            _fmt(acc["merged"]),
            _fmt(acc["compare"]),
            str(task["forgotten"]),
        )
    show(tasks)
    out.print(
        f"{mean['forgotten']} examples forgotten; the hardest {mean['hardest_bins']} of "
        f"{result['bins']} bins hold {_fmt(mean['hardest_share'])} of them (mean over tasks)",
        highlight=False,
    )
    for path in result.get("plots", []):
        out.print(f"wrote {path}", highlight=False)


@analyze_app.command()
@handle_errors
def diwa(
    recipe: RecipeOpt,
    seeds: Annotated[
        str | None,
        typer.Option("--seeds", help="Runs: the recipe once per seed ({seed} in its model paths)."),
    ] = None,
    over_checkpoints: SweepRunsOpt = False,
    match: MatchOpt = "step",
    test: TestOpt = False,
    plot: PlotOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """DiWA's bias–variance–covariance decomposition of the merge's error over runs
    (training-duration §5.1)."""
    from mergecli.analyze.diwa import FIELDS, analyze_diwa
    from mergecli.analyze.example_plots import write_diwa_plot
    from mergecli.cli import print_warnings
    from mergecli.sweep.grid import parse_values

    values = [int(v) for v in parse_values(seeds, "--seeds")] if seeds else None
    result = analyze_diwa(
        mergecli.load_recipe(recipe),
        values,
        "test" if test else "validation",
        device,
        count_bar_for(err, quiet or json_out),
        over_checkpoints,
        match,
    )
    if values is None or len(values) < 2:
        print_warnings(["one run: variance and covariance are 0 (give --seeds for several)"])
    _plots(plot, write_diwa_plot, result)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    m = len(result["members"])
    runs = len(values or [0])
    columns = ("bias²", "variance", "covariance", "ensemble", "merged", "ens. acc", "merged acc")
    what = f"{m} members, {runs} runs ({result['data']})"
    if "points" in result:
        table = Table(title=f"DiWA decomposition over training, mean over tasks, {what}")
        table.add_column("step" if result["match"] == "step" else "fraction")
        rows = {
            _fmt(p["step"]) if result["match"] == "step" else f"{p['fraction']:.2f}": p["mean"]
            for p in result["points"]
        }
    else:
        table = Table(title=f"DiWA decomposition of the {result['method']} merge's error, {what}")
        table.add_column("task")
        rows = {**result["tasks"], "mean": result["mean"]}
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_fmt(row[f]) for f in FIELDS))
    show(table)
    out.print(
        f"ensemble = bias² + variance/{m} + (1 − 1/{m})·covariance (Brier score of the "
        "probabilities); merged − ensemble is DiWA's locality term",
        highlight=False,
    )
    for path in result.get("plots", []):
        out.print(f"wrote {path}", highlight=False)
