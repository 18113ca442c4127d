"""Command `moe`: upcycle experts into a mixture of experts."""

from __future__ import annotations

from typing import Annotated

import typer

import mergecli
from mergecli.cli import (
    DeviceOpt,
    DryRunOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    RecipeArg,
    ShardOpt,
    app,
    err,
    handle_errors,
    out,
    output_folder,
    print_json,
    print_warnings,
)
from mergecli.cli.merge import print_plan
from mergecli.progress import progress_for
from mergecli.report import human_bytes


@app.command()
@handle_errors
def moe(
    recipe: RecipeArg,
    output: OutputOpt = None,
    shard_size: ShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    train_steps: Annotated[
        int | None,
        typer.Option(
            "--train-steps", min=0, help="Train routers and experts N steps (base frozen)."
        ),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", min=1e-12, help="Learning rate of the training.")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Upcycle the recipe's experts into a mixture of experts (moe: section): LoRA experts into
    an Arrow MoE (peft), full fine-tunes into a sparse MoE model (Mixtral, Qwen-MoE)."""
    from mergecli.moe import plan_moe, run_moe

    spec = mergecli.load_recipe(recipe)
    if spec.moe is not None and train_steps is not None:
        spec.moe.train_steps = train_steps
    if spec.moe is not None and lr is not None:
        spec.moe.lr = lr
    target = output_folder(recipe, spec, output, dry_run)
    plan = plan_moe(spec, shard_size=shard_size, device=device)
    print_warnings(plan.warnings)
    if dry_run:
        summary = plan.summary()
        if json_out:
            print_json(summary)
        else:
            print_plan(summary, "moe plan")
        return
    assert target is not None
    result = run_moe(plan, target, force=force, progress=progress_for(err, quiet))
    report = result.report
    print_warnings(report.get("warnings", []))
    keys: tuple[str, ...] = ("output", "kind", "manifest", "layers", "training", "wall_s")
    keys = (*keys, "bytes_read", "bytes_written")
    summary = {k: report[k] for k in (*keys, "peak_rss_bytes") if k in report}
    if json_out:
        print_json(summary)
    elif not quiet:
        what = (
            f"Arrow MoE of {len(plan.adapters)} LoRA experts over {len(plan.modules)} modules"
            if plan.kind == "arrow"
            else f"{plan.config.architectures[0]} of {len(plan.experts)} experts"
        )
        out.print(
            f"wrote {what} into {report['output']} in {report['wall_s']:.2f} s (read "
            f"{human_bytes(report['bytes_read'])}, wrote {human_bytes(report['bytes_written'])}, "
            f"peak memory {human_bytes(report['peak_rss_bytes'])})",
            highlight=False,
        )
