"""Commands `analyze interference` and `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import mergecli
from mergecli.cli import (
    AddressOpt,
    DeviceOpt,
    ExecutorOpt,
    JsonOpt,
    MatchOpt,
    QuietOpt,
    SweepRunsOpt,
    app,
    err,
    handle_errors,
    out,
    print_json,
    print_warnings,
)
from mergecli.distributed.executor import executor_for
from mergecli.errors import MergeError, RecipeError
from mergecli.progress import progress_for
from mergecli.report import human_bytes

analyze_app = typer.Typer(
    help="Measure the experts of a recipe before merging them.", no_args_is_help=True
)
app.add_typer(analyze_app, name="analyze")

COLUMNS = {
    "sign_conflict": "sign conflict %",
    "overlap": "overlap %",
    "magnitude_ratio": "mag. ratio",
    "cosine": "cosine",
    "variance": "variance",
    "ties_sign_conflict": "TIES conflict %",
    "tall_selfish": "TALL selfish %",
    "tall_catastrophic": "TALL catastr. %",
}
WIDE = 150
"""Width of the tables when stdout is not a terminal (files, pipes)."""


def show(table: Table) -> None:
    """Print a table; off a terminal (files, pipes) at a fixed wide width, not rich's 80."""
    (out if out.is_terminal else Console(file=out.file, width=WIDE)).print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value)


@analyze_app.command()
@handle_errors
def interference(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe naming base_model and the experts.")
    ] = Path("recipe.yaml"),
    top_k: Annotated[
        float, typer.Option("--top-k", help="Fraction of each task vector kept by magnitude.")
    ] = 0.2,
    tall_lambda: Annotated[
        float, typer.Option("--tall-lambda", help="λ of the TALL masks |τt| > λ|τMTL − τt|.")
    ] = 0.6,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write PNG heatmaps and curves into DIR.")
    ] = None,
    over_checkpoints: SweepRunsOpt = False,
    match: MatchOpt = "step",
    blocks: Annotated[bool, typer.Option("--blocks", help="Also print the per-block table.")] = (
        False
    ),
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="With --over-checkpoints: run once per seed ({seed} in the recipe's paths) "
            "and report mean ± std.",
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sign conflicts, overlap, magnitude ratio, cosine, variance, TIES and TALL figures."""
    from mergecli.analyze import analyze_interference, analyze_over_checkpoints
    from mergecli.analyze.plots import write_plots, write_sweep_plot

    spec = mergecli.load_recipe(recipe)
    if executor != "local" and not over_checkpoints:
        raise MergeError(f"--executor {executor}: only --over-checkpoints runs points as tasks")
    progress = progress_for(err, quiet or json_out)
    try:
        runner = executor_for(executor, address)
        if over_checkpoints and seeds is not None:
            from mergecli.seeds import over_seeds
            from mergecli.sweep.grid import parse_values

            result = over_seeds(
                lambda one: analyze_over_checkpoints(
                    one, match, top_k, tall_lambda, device, progress, runner
                ),
                spec,
                [int(v) for v in parse_values(seeds, "--seeds")],
            )
        elif seeds is not None:
            raise RecipeError(
                "--seeds: aggregates analyses over checkpoints; add --over-checkpoints",
                key="--seeds",
            )
        elif over_checkpoints:
            result = analyze_over_checkpoints(
                spec, match, top_k, tall_lambda, device, progress, runner
            )
        else:
            result = analyze_interference(spec, top_k, tall_lambda, device, progress)
    finally:
        progress.stop()
    plots: list[Path] = []
    if plot is not None:
        from mergecli.engine.output import output_errors

        with output_errors(plot.resolve()):
            plots = (
                [write_sweep_plot(result, plot)] if over_checkpoints else write_plots(result, plot)
            )
        result["plots"] = [str(p) for p in plots]
    points = result.get("per_seed", [result])
    points = [p for r in points for p in r["points"]] if over_checkpoints else [result]
    print_warnings(list(dict.fromkeys(w for point in points for w in point["warnings"])))
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    if over_checkpoints:
        print_sweep(result)
    else:
        print_analysis(result, blocks)
    for path in plots:
        out.print(f"wrote {path}", highlight=False)


def print_analysis(result: dict[str, Any], blocks: bool) -> None:
    experts, model = result["experts"], result["model"]
    out.print(
        f"Interference of {len(experts)} experts: top {result['top_k']:.0%} of each task vector "
        f"by magnitude (whole model), {model['parameters']:,} parameters, base "
        f"{result['base']}",
        highlight=False,
    )
    pairs = Table(title="expert pairs (whole model)")
    for column in ("pair", "sign conflict %", "overlap s→t %", "overlap t→s %", "mag. ratio"):
        pairs.add_column(column, justify="right" if column != "pair" else "left")
    pairs.add_column("cosine", justify="right")
    for s in range(len(experts)):
        for t in range(s + 1, len(experts)):
            pairs.add_row(
                f"{experts[s]} × {experts[t]}",
                *(_fmt(model[m]["matrix"][s][t]) for m in ("sign_conflict", "overlap")),
                _fmt(model["overlap"]["matrix"][t][s]),
                *(_fmt(model[m]["matrix"][s][t]) for m in ("magnitude_ratio", "cosine")),
            )
    pairs.add_section()
    pairs.add_row(
        "mean over pairs",
        _fmt(model["sign_conflict"]["mean"]),
        _fmt(model["overlap"]["mean"]),
        "",
        _fmt(model["magnitude_ratio"]["mean"]),
        _fmt(model["cosine"]["mean"]),
    )
    show(pairs)
    table = Table(title="experts (whole model)")
    for column in ("expert", "‖τ‖", "top-k threshold", "kept %"):
        table.add_column(column, justify="left" if column == "expert" else "right")
    for t, name in enumerate(experts):
        table.add_row(
            name, _fmt(model["norm"][t]), _fmt(result["thresholds"][t]), _fmt(model["kept"][t])
        )
    show(table)
    out.print(
        "all experts: "
        + ", ".join(f"{COLUMNS[k]} {_fmt(model[k])}" for k in list(COLUMNS)[4:])
        + f" (TALL λ = {result['tall_lambda']})",
        highlight=False,
    )
    if result["layers"]:
        show(group_table("per layer (means over pairs)", "layer", result["layers"]))
    if blocks:
        show(group_table("per block (means over pairs)", "block", result["blocks"]))


def group_table(title: str, key: str, groups: list[dict[str, Any]]) -> Table:
    from mergecli.analyze.plots import summary_value

    table = Table(title=title)
    table.add_column(key, no_wrap=True)
    for label in COLUMNS.values():
        table.add_column(label, justify="right")
    for group in groups:
        table.add_row(group[key], *(_fmt(summary_value(group, m)) for m in COLUMNS))
    return table


def print_sweep(sweep: dict[str, Any]) -> None:
    from mergecli.analyze.plots import summary_value

    by_step = sweep["match"] == "step"
    table = Table(title=f"interference over training (matched by {sweep['match']}, whole model)")
    table.add_column("step" if by_step else "fraction")
    table.add_column("checkpoints")
    for label in COLUMNS.values():
        table.add_column(label, justify="right")
    std = sweep.get("std")
    for i, point in enumerate(sweep["points"]):
        steps = ", ".join(
            f"{name}@{_fmt(step)}"
            for name, step in zip(sweep["experts"], point["steps"], strict=True)
            if step is not None
        )
        spread = std["points"][i]["model"] if std else None
        table.add_row(
            _fmt(point["step"]) if by_step else f"{point['fraction']:.2f}",
            steps,
            *(
                _fmt(summary_value(point["model"], m))
                + (f" ± {_fmt(summary_value(spread, m))}" if spread else "")
                for m in COLUMNS
            ),
        )
    show(table)
    if std:
        seeds = ", ".join(map(str, sweep["seeds"]))
        out.print(f"mean ± std over seeds {seeds} (sample std)", highlight=False)


@app.command()
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="A checkpoint, adapter or training-run folder.")],
    json_out: JsonOpt = False,
) -> None:
    """Architecture, parameters, dtypes, shards and size; for an adapter its type, rank, targets."""
    from mergecli.analyze.describe import describe_path

    info = describe_path(path)
    if json_out:
        print_json(info)
        return
    table = Table(title=f"{info['kind'].replace('_', ' ')}: {info['path']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in info.get("adapter", {}).items():
        if value not in (None, [], {}):
            table.add_row(f"adapter {key.replace('_', ' ')}", _text(value))
    for key, value in info.get("config", {}).items():
        table.add_row(key.replace("_", " "), _text(value))
    if "tensors" in info:
        table.add_row("tensors", f"{info['tensors']:,}")
        table.add_row("parameters", f"{info['parameters']:,}")
        table.add_row("dtypes", ", ".join(f"{d}: {n:,}" for d, n in info["dtypes"].items()))
        if info["layers"]:
            table.add_row("layers", str(info["layers"]))
        table.add_row(
            "shards",
            "\n".join(
                f"{s['file']} ({s['tensors']} tensors, {human_bytes(s['bytes'])})"
                for s in info["shards"]
            ),
        )
        table.add_row("weights", human_bytes(info["weights_bytes"]))
    if "checkpoints" in info:
        table.add_row(
            "checkpoints",
            "\n".join(
                f"step {c['step']}: {Path(c['path']).name} ({human_bytes(c['bytes'])})"
                for c in info["checkpoints"]
            ),
        )
    table.add_row("size on disk", human_bytes(info["size_on_disk"]))
    out.print(table)


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
