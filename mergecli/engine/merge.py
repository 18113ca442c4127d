"""Run a planned merge on the runner: statistics passes, then one stream that merges each piece,
sums the report's figures and hands the result to the output plug-in."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.figures import ReportSums, summarize
from mergecli.engine.finite import check_finite
from mergecli.engine.folder_run import folder_run
from mergecli.engine.outputs import InMemory
from mergecli.engine.plan import MergePlan, TensorPlan
from mergecli.engine.runner import Pass, Piece, Runner, Timer, Unchecked, WriteQueue
from mergecli.engine.store import Store
from mergecli.engine.threads import compute_threads
from mergecli.errors import MergeError, OutputError, ShapeError
from mergecli.methods import TaskMasks, TensorInputs
from mergecli.methods.result import Merged, as_merged
from mergecli.methods.statistics import StatValues
from mergecli.progress import Progress
from mergecli.report import model_card, write_reports

VOLATILE_PLAN = ("base", "experts", "device", "peak_memory_estimate")
"""Plan figures that depend on the machine or the paths: in the report's ``run`` section."""


@dataclass
class MergeResult:
    """What a merge wrote and measured."""

    output: Path
    report: dict[str, Any]


class MergePass:
    """The merge pass: the method's result for each merged piece (``piece.merged``)."""

    def __init__(self, plan: MergePlan, stats: StatValues, timer: Timer) -> None:
        self.plan = plan
        self.stats = stats
        self.timer = timer

    def piece(self, piece: Piece, queue: WriteQueue) -> None:
        if piece.inputs is None:
            return
        start = time.perf_counter()
        piece.merged = merge_tensor(
            self.plan, piece.tensor, piece.inputs, self.stats, piece.unchecked
        )
        self.timer.compute += time.perf_counter() - start


def run_merge(
    plan: MergePlan,
    output: str | Path,
    force: bool = False,
    progress: Progress | None = None,
    wait: bool = False,
) -> MergeResult:
    """Execute a plan into ``output`` (atomically, under the output's lock; ``wait`` for a run
    that holds it instead of failing) and return the report."""
    with (
        compute_threads(),
        folder_run(output, force, wait, plan.bytes_to_write, progress) as run,
    ):
        runner, folder = run.runner, run.folder
        stats = statistics(plan, runner)
        writer = plan.output.open(folder, plan.target())
        sums, store = ReportSums(), Store(writer, runner.timer)
        passes: list[Pass] = [MergePass(plan, stats, runner.timer), sums, store]
        runner.run(plan.merge_reads(), passes, "merging")
        per_tensor = {n: {**r, **store.extra.get(n, {})} for n, r in sums.per_tensor().items()}
        section, lines = writer.finish(per_tensor)
        report = build_report(
            plan,
            run.output,
            per_tensor,
            runner.timer,
            writer.bytes_written,
            run.wall,
            run.started_at,
        )
        report.update(section)
        write_merge_reports(folder, plan, report, lines)
    return MergeResult(run.output, report)


def write_merge_reports(
    folder: Path, plan: MergePlan, report: dict[str, Any], lines: list[str]
) -> None:
    """merge_report.json / .md (with the output's Markdown ``lines``) and the model card."""
    write_reports(folder, report, lines)
    (folder / "README.md").write_text(model_card(plan))


def statistics(plan: MergePlan, runner: Runner) -> StatValues:
    """The method's whole-model statistics, gathered over the merged tensors (their pieces
    checked for NaN/Inf as read unless the merge pass after them checks its inputs)."""
    merged = plan.read_plan([t for t in plan.tensors if t.merge])
    check = plan.merge_reads().check_reads
    return runner.statistics(replace(merged, check_reads=check), plan.statistics)


def merge_state(plan: MergePlan, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Run a plan into memory: the merged model's state dict (tensor name → tensor).

    Holds the whole merged model, which is what evaluating it needs anyway; an output that is
    not one model (a task-mask artifact, an adapter) is written into folders only.
    """
    reason = plan.output.memory_error()
    if reason is not None:
        raise OutputError(reason, "memory")
    runner = Runner(progress)
    stats = statistics(plan, runner)
    memory = InMemory()
    passes: list[Pass] = [MergePass(plan, stats, runner.timer), Store(memory, runner.timer)]
    runner.run(plan.merge_reads(memory), passes, "merging")
    runner.progress.stop()
    return memory.state


def merge_tensor(
    plan: MergePlan,
    tensor: TensorPlan,
    inputs: TensorInputs,
    stats: StatValues,
    unchecked: list[Unchecked] | None = None,
) -> Merged:
    """The method's result for one tensor; an unexpected failure names the tensor. The
    finite-value guard runs on the ``unchecked`` inputs, then on the result, unless the method
    checked both as it computed (``Merged.checked``)."""
    inputs.stats = stats
    mode = plan.recipe.on_nonfinite
    try:
        merged = as_merged(plan.method.fn(inputs, tensor.params), inputs.num_experts)
    except MergeError:
        raise
    except Exception as exc:
        for piece in unchecked or []:  # a failure on NaN inputs says so
            piece.check(tensor.name, mode, plan.warnings)
        raise ShapeError(
            f"{plan.method.name} failed on '{tensor.name}': {exc}", tensor=tensor.name
        ) from exc
    if merged.checked:
        return merged
    for piece in unchecked or []:
        piece.check(tensor.name, mode, plan.warnings)
    # the finite-value guard on what the method returned (every merge goes through here)
    value = merged.value
    values = value.unified if isinstance(value, TaskMasks) else value
    label = f"{plan.method.name} (merged)"
    check_finite(values, tensor.name, label, None, mode, plan.warnings)
    return merged


def build_report(
    plan: MergePlan,
    output: Path,
    per_tensor: dict[str, Any],
    timer: Timer,
    bytes_written: int,
    wall: float,
    started: str,
) -> dict[str, Any]:
    """The merge report: inputs, parameters, totals and (``report: full``) per-tensor figures;
    what differs from one run of the same recipe to the next (timings, memory, paths, host,
    device) sits under ``run``, so two runs' reports are otherwise identical."""
    inputs = ([("base", plan.base)] if plan.base else []) + list(
        zip(plan.expert_names, plan.experts, strict=True)
    )
    summary = plan.summary()
    return {
        "mergecli_report": 1,
        "recipe": plan.recipe.model_dump(mode="json", exclude={"folder"}),
        "method": plan.method.name,
        "inputs": [
            {"role": role, "bytes": src.nbytes, "fingerprint": src.fingerprint()}
            for role, src in inputs
        ],
        "plan": {k: v for k, v in summary.items() if k not in VOLATILE_PLAN},
        "totals": summarize(per_tensor, len(plan.experts)),
        **({"tensors": per_tensor} if plan.recipe.report == "full" else {}),
        "bytes_read": timer.bytes_read,
        "bytes_written": bytes_written,
        "run": {
            "output": str(output),
            "inputs": [str(src.path) for _, src in inputs],
            "host": platform.node(),
            "started": started,
            "timing": {
                "wall_s": wall,
                "read_s": timer.read,
                "compute_s": timer.compute,
                "write_s": timer.write,
            },
            "throughput_bytes_per_s": timer.bytes_read / wall if wall > 0 else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(),
            **{k: summary[k] for k in VOLATILE_PLAN},
        },
    }
