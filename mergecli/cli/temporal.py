"""Commands `temporal RECIPE` (= `temporal replay`), `temporal init`, `add` and `status`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import yaml
from rich.table import Table
from typer.core import TyperGroup

import mergecli
from mergecli.cli import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ShardOpt,
    app,
    err,
    handle_errors,
    out,
    print_json,
    print_warnings,
)
from mergecli.errors import RecipeError, did_you_mean
from mergecli.progress import progress_for
from mergecli.report import human_bytes

if TYPE_CHECKING:
    from mergecli.temporal import StepResult


class TemporalGroup(TyperGroup):
    """`mergecli temporal RECIPE ...` is `mergecli temporal replay RECIPE ...`.

    A first word that is no command, no file, and close to a command name stays a (mistyped)
    command, so that click suggests the command.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        first = args[0] if args else "-"
        mistyped = not Path(first).exists() and did_you_mean(first, self.commands)
        if not first.startswith("-") and first not in self.commands and not mistyped:
            args = ["replay", *args]
        return super().parse_args(ctx, args)


temporal_app = typer.Typer(
    cls=TemporalGroup,
    name="temporal",
    no_args_is_help=True,
    subcommand_metavar="RECIPE | COMMAND [ARGS]...",
    help=(
        "Temporal merging (TIME): fold experts that arrive one after another into a state "
        "folder, which keeps the model to deploy now (STATE/deploy) and the model to train the "
        "next expert from (STATE/init).\n\n"
        "mergecli temporal init STATE --base BASE [--method M] [--init ema] [--deploy ema]: "
        "create a state.\n\n"
        "mergecli temporal add STATE EXPERT: fold in the next expert.\n\n"
        "mergecli temporal status STATE: the sequence, the strategies and the sizes on disk.\n\n"
        "mergecli temporal RECIPE (same as 'replay RECIPE'): fold a recipe's experts in order, "
        "as set by its temporal: section.\n\n"
        "mergecli temporal evaluate RECIPE -o STUDY: score every step of each (init, deploy) "
        "pair (A_KA, A_ZS, trajectory plot)."
    ),
)
app.add_typer(temporal_app)

StateArg = Annotated[Path, typer.Argument(help="State folder.", show_default=False)]


def parse_params(raw: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as YAML (0.3, true, [0.1, 0.5], model)."""
    params: dict[str, Any] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"--param '{item}': expected KEY=VALUE, e.g. density=0.3", key="--param"
            )
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RecipeError(
                f"--param '{item}': the value is not valid YAML", key="--param"
            ) from None
    return params


@temporal_app.command("init")
@handle_errors
def init(
    state: StateArg,
    base: Annotated[Path, typer.Option("--base", help="Base model folder (θ0).")],
    method: Annotated[str, typer.Option("--method", help="Merging method f.")] = "linear",
    init_strategy: Annotated[
        Literal["base", "latest", "ema"],
        typer.Option("--init", help="Model the next expert trains from."),
    ] = "ema",
    deploy: Annotated[
        Literal["latest", "ema", "all"],
        typer.Option("--deploy", help="Model to serve: latest expert, EMA, or f over all experts."),
    ] = "ema",
    ema_weight: Annotated[
        float, typer.Option("--ema-weight", help="w in EMA_t = f(EMA_{t-1}, θt; 1-w, w).")
    ] = 0.5,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Method parameter KEY=VALUE (repeatable).")
    ] = None,
    keep_steps: Annotated[
        bool, typer.Option("--keep-steps", help="Keep every step's deploy model.")
    ] = False,
    out_dtype: Annotated[
        str | None, typer.Option("--out-dtype", help="Dtype of the models written.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of random masks (DARE).")] = 0,
    json_out: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Start an existing state over.")] = False,
) -> None:
    """Create a temporal state folder (step 0: init and deploy are the base)."""
    settings = {
        "merge_method": method,
        "base_model": str(base),
        "parameters": parse_params(param or []),
        "out_dtype": out_dtype,
        "seed": seed,
        "temporal": {
            "init": init_strategy,
            "deploy": deploy,
            "ema_weight": ema_weight,
            "keep_steps": keep_steps,
        },
    }
    from mergecli.temporal import init_state

    _, warnings = init_state(state, settings, force=force)
    print_warnings(warnings)
    if json_out:
        print_json({"state": str(state.resolve()), "warnings": warnings})
        return
    out.print(
        f"created temporal state {state} ({method}, init {init_strategy}, deploy {deploy}, "
        f"ema weight {ema_weight}); train the first expert from {state / 'init'}",
        highlight=False,
    )


@temporal_app.command("add")
@handle_errors
def add(
    state: StateArg,
    expert: Annotated[Path, typer.Argument(help="The next expert's folder.", show_default=False)],
    name: Annotated[
        str | None, typer.Option("--name", help="Expert name (default: folder name).")
    ] = None,
    device: DeviceOpt = "cpu",
    shard_size: ShardOpt = "5GB",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold the next expert into a state: writes the new deploy and init models atomically."""
    from mergecli.temporal import add_expert

    result = add_expert(
        state, expert, name, device, shard_size, new_progress=lambda: progress_for(err, quiet)
    )
    print_warnings(result.warnings)
    if json_out:
        print_json(result.summary())
    elif not quiet:
        out.print(
            f"{step_line(result)}\n(links: {state / 'deploy'}, {state / 'init'})", highlight=False
        )


def step_line(result: StepResult) -> str:
    if not result.added:
        return (
            f"step {result.step} ({result.name}) was already folded in; finished its links and "
            f"cleanup. deploy → {result.deploy_model}; init → {result.init_model}"
        )
    merges = ", ".join(f"{m['model']} in {m['wall_s']:.2f} s" for m in result.merges)
    return (
        f"step {result.step}: folded {result.name}"
        + (f" (merged {merges})" if merges else "")
        + f"; deploy → {result.deploy_model}; next training starts from → {result.init_model}"
    )


@temporal_app.command("status")
@handle_errors
def status(state: StateArg, json_out: JsonOpt = False) -> None:
    """Show a state's strategies, its sequence of experts and its sizes on disk."""
    from mergecli.temporal import status as state_status

    info = state_status(state)
    if json_out:
        print_json(info)
        return
    params = ", ".join(f"{k}={v}" for k, v in info["parameters"].items()) or "defaults"
    disk = info["disk"]
    out.print(
        f"{info['state']}: {info['steps']} steps, {info['method']} ({params}), "
        f"init {info['init']}, deploy {info['deploy']}, ema weight {info['ema_weight']}"
        f"{', keeps every step' if info['keep_steps'] else ''}\n"
        f"base {info['base']['path']} ({info['base']['source']})\n"
        f"deploy → {info['deploy_model']}\ninit   → {info['init_model']}\n"
        f"on disk: state {human_bytes(disk['state_bytes'])} (EMA "
        f"{human_bytes(disk['ema_bytes'])}, all {human_bytes(disk['merged_bytes'])}, kept steps "
        f"{human_bytes(disk['kept_steps_bytes'])}); inputs it still reads "
        f"{human_bytes(disk['referenced_bytes'])}",
        highlight=False,
    )
    if info["experts"]:
        table = Table(title="experts")
        for column in ("step", "name", "path", "source", "still needed", "deploy model kept"):
            table.add_column(column, overflow="fold")
        for e in info["experts"]:
            table.add_row(
                str(e["step"]),
                e["name"],
                e["path"],
                e["source"],
                "yes" if e["needed"] else "no",
                e["deploy"] or "–",
            )
        out.print(table)


@temporal_app.command("replay")
@handle_errors
def replay(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe with a temporal: section.", show_default=False)
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="State folder (overrides the recipe).")
    ] = None,
    device: DeviceOpt = "cpu",
    shard_size: ShardOpt = "5GB",
    json_out: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Start the state over.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold a recipe's experts in order (resumes an interrupted run of the same recipe)."""
    from mergecli.temporal import replay as replay_recipe

    spec = mergecli.load_recipe(recipe)

    def on_step(step: StepResult) -> None:
        print_warnings(step.warnings)
        if not (quiet or json_out):
            out.print(step_line(step), highlight=False)

    result = replay_recipe(
        spec,
        output,
        force,
        device,
        shard_size,
        new_progress=lambda: progress_for(err, quiet),
        on_step=on_step,
        source=str(recipe),
    )
    print_warnings(result.warnings)
    if json_out:
        print_json(
            {
                "state": str(result.state),
                "resumed_at": result.resumed_at,
                "steps": [s.summary() for s in result.steps],
            }
        )
    elif not quiet:
        out.print(
            f"{result.state}: {result.resumed_at + len(result.steps)} steps "
            f"({len(result.steps)} folded now)",
            highlight=False,
        )


@temporal_app.command("evaluate")
@handle_errors
def evaluate(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="YAML recipe with temporal: and evaluate: sections.", show_default=False
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Study folder: states, experts, JSON, PNG.")
    ],
    pairs: Annotated[
        str | None,
        typer.Option(
            "--pairs",
            help="'all' or INIT/DEPLOY,... (default: all 8 with temporal.train, else init base).",
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Start the study over.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score every step of each (init, deploy) pair: A_KA, A_ZS and √(A_KA·A_ZS) (TIME §3)."""
    from mergecli.temporal.timeline import FIGURE, RESULT, evaluate_over_time, parse_pairs

    spec = mergecli.load_recipe(recipe)

    def on_row(row: dict[str, Any]) -> None:
        if not (quiet or json_out):
            err.print(
                f"{row['init']}/{row['deploy']} step {row['step']}: A_KA {fmt(row['ka'])}, "
                f"A_ZS {fmt(row['zs'])}",
                highlight=False,
            )

    result = evaluate_over_time(
        spec,
        output,
        parse_pairs(pairs) if pairs else None,
        device,
        force=force,
        new_progress=lambda: progress_for(err, True),
        on_row=on_row,
        source=str(recipe),
    )
    print_warnings(result["warnings"])
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    table = Table(
        title=f"{result['method']} over time: mean {result['metric']} on {result['reported_on']} "
        f"data (adaptation: {', '.join(result['adaptation_tasks'])}; held out: "
        f"{', '.join(result['held_out_tasks']) or 'none'})"
    )
    columns = ("init", "deploy", "step", "expert", "A_KA", "A_ZS", "√(KA·ZS)", "known", "unseen")
    for column in columns:
        left = column in ("init", "deploy", "expert")
        table.add_column(column, justify="left" if left else "right", no_wrap=not left)
    for row in [{**result["base"], "init": "–", "deploy": "θ0"}, *result["rows"]]:
        table.add_row(
            row["init"],
            row["deploy"],
            str(row["step"]),
            row["expert"] or "–",
            *(fmt(row[k]) for k in ("ka", "zs", "geo", "known", "unseen")),
        )
    out.print(table)
    out.print(f"{output / RESULT}, {output / FIGURE}", highlight=False)


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
