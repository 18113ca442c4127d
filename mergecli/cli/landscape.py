"""Commands `analyze barriers` and `analyze gains`: the optimiser-bias paper's landscape and
noise measurements (and the training-duration paper's §5.2)."""

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
    err,
    handle_errors,
    out,
    print_json,
)
from mergecli.cli.analyze import analyze_app, show
from mergecli.cli.evaluate import _fmt, _target
from mergecli.distributed.executor import executor_for
from mergecli.progress import count_bar_for

AlphasOpt = Annotated[str, typer.Option("--alphas", help="α grid (start:stop:step or list).")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="Built-in metric to use instead.")]


@analyze_app.command()
@handle_errors
def barriers(
    recipe: RecipeArg,
    alphas: AlphasOpt = "0:1:0.1",
    metric: Annotated[
        str | None, typer.Option("--metric", help="Built-in metric (default loss).")
    ] = None,
    over_checkpoints: Annotated[
        bool,
        typer.Option(
            "--over-checkpoints",
            help="Experts are runs with checkpoint-<step> folders: measure at each duration.",
        ),
    ] = False,
    by: Annotated[
        str, typer.Option("--by", help="Durations by 'tstar' (multiples of T*) or by 'step'.")
    ] = "tstar",
    multiples: Annotated[
        str, typer.Option("--multiples", help="Multiples of T* (list or start:stop:step).")
    ] = "0.25,0.5,0.75,1,1.5,2,3,5",
    output: OutputOpt = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Barriers (ends and chord) of every expert pair's linear path, averaged over pairs.

    Once, or with --over-checkpoints at each training duration of the experts' runs."""
    from mergecli.evaluate import Scorer
    from mergecli.sweep.barriers import barriers as run_barriers
    from mergecli.sweep.grid import parse_values
    from mergecli.sweep.landscape import landscape_recipe
    from mergecli.sweep.plots import barriers_figure
    from mergecli.sweep.results import write_results

    spec = landscape_recipe(mergecli.load_recipe(recipe), metric, str(recipe))
    target = _target(recipe, spec, output, force) if output else None
    scorer = Scorer(
        spec, device, count_bar_for(err, quiet or json_out), executor_for(executor, address)
    )
    result = run_barriers(
        spec,
        scorer,
        [float(a) for a in parse_values(alphas, "--alphas")],
        over_checkpoints,
        by,
        [float(m) for m in parse_values(multiples, "--multiples")],
    )
    if target is not None:
        write_results(result, target, force, "barriers", barriers_figure)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    table = Table(title=f"barriers of {result['metric']} on (1−α)θA + αθB, per expert pair")
    points = result.get("points", [result])
    if "points" in result:
        table.add_column("× T*" if result["by"] == "tstar" else "step", justify="right")
    table.add_column("pair")
    table.add_column("barrier (ends)", justify="right")
    table.add_column("barrier (chord)", justify="right")
    for point in points:
        for i, pair in enumerate(point["pairs"]):
            lead = [_fmt(point["x"]) if i == 0 else ""] if "points" in result else []
            table.add_row(
                *lead,
                "–".join(pair["models"]),
                _fmt(pair["barrier"]),
                _fmt(pair["chord_barrier"]),
            )
        label = ["", "mean"] if "points" in result else ["mean"]
        table.add_row(*label, _fmt(point["barrier"]), _fmt(point["chord_barrier"]), style="bold")
    show(table)
    out.print(
        f"mean over pairs{' and durations' if 'points' in result else ''}: barrier "
        f"{_fmt(result['barrier'])} (max − mean of ends), {_fmt(result['chord_barrier'])} "
        "(max above the chord)",
        highlight=False,
    )
    for file in result.get("files", []):
        out.print(f"wrote {file}", highlight=False)


@analyze_app.command()
@handle_errors
def gains(
    recipes: Annotated[
        list[Path],
        typer.Argument(help="YAML recipes, one per training setting", show_default=False),
    ],
    swa: Annotated[
        int | None,
        typer.Option("--swa", help="Also the SWA gain: average each run's last K checkpoints."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate η of every run.")] = None,
    batch_size: Annotated[
        float | None, typer.Option("--batch-size", help="Batch size B of every run.")
    ] = None,
    momentum: Annotated[
        float | None, typer.Option("--momentum", help="Momentum μ (Adam: β1) of every run.")
    ] = None,
    metric: MetricOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write gains.json and gains.png here.")
    ] = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge gain, SWA gain and normalised accuracy against the noise scale S̃ = η/(B(1−μ)).

    One recipe per training setting; η, B, μ from each run's training metadata or given."""
    from mergecli.engine.output import check_output
    from mergecli.evaluate import Scorer
    from mergecli.sweep.gains import gains as run_gains
    from mergecli.sweep.landscape import with_metric
    from mergecli.sweep.plots import gains_figure
    from mergecli.sweep.results import write_results

    specs = [with_metric(mergecli.load_recipe(r), metric, str(r)) for r in recipes]
    if output is not None:
        check_output(output.resolve(), force)
    runner = executor_for(executor, address)
    bar = count_bar_for(err, quiet or json_out)
    scorers = [Scorer(s, device, bar, runner) for s in specs]
    given = {"learning_rate": lr, "batch_size": batch_size, "momentum": momentum}
    labels = _labels(recipes)
    result = run_gains(list(zip(labels, specs, strict=True)), scorers, swa, given)
    for row in result["settings"]:
        for warning in row["warnings"]:
            err.print(f"[yellow]warning:[/] {row['setting']}: {warning}", highlight=False)
    if output is not None:
        write_results(result, output.resolve(), force, "gains", gains_figure)
    if json_out:
        print_json(result)
        return
    if not quiet:
        _gains_table(result)


def _labels(recipes: list[Path]) -> list[str]:
    """Each recipe's file stem, or its path where stems repeat."""
    stems = [r.stem for r in recipes]
    return [s if stems.count(s) == 1 else str(r) for s, r in zip(stems, recipes, strict=True)]


def _gains_table(result: dict[str, Any]) -> None:
    rows = result["settings"]
    with_swa = all("swa" in r for r in rows)
    table = Table(title=f"merging gain against S̃ = η / (B(1 − μ)); f = mean {result['metric']}")
    for column in ("setting", "η", "B", "μ", "S̃", "f(merge)", "mean f(experts)", "gain"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    table.add_column("normalised", justify="right")
    if with_swa:
        table.add_column(f"SWA gain (k={rows[0]['swa']['k']})", justify="right")
    for r in rows:
        training = list(r["training"].values())
        keys = ("learning_rate", "batch_size", "momentum")
        values = ["/".join(sorted({_fmt(t[k]) for t in training})) for k in keys]
        table.add_row(
            r["setting"],
            *values,
            _fmt(r["noise_scale"]),
            _fmt(r["merged"]["score"]),
            _fmt(r["expert_score"]),
            _fmt(r["merge_gain"]),
            _fmt(r["normalized"]) if r["normalized"] is not None else "–",
            *([_fmt(r["swa"]["gain"])] if with_swa else []),
        )
    show(table)
    for file in result.get("files", []):
        out.print(f"wrote {file}", highlight=False)
