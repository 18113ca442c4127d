"""One merge split over a Ray cluster: a work unit per output shard.

Each work unit is the runner over the read plan of one shard's tensors, with the merge, report
sums and store passes, writing that shard's file into the output's temporary folder (which
every node must see). Whole-model statistics (TIES' model-scope thresholds) are gathered the
same way: per pass, each unit histograms its tensors and the driver adds the histograms up and
ends the pass. The driver then writes the index, config, tokenizer, model card and report and
renames the folder into place, so the folder is byte-identical to a local run's (the report's
timings aside).

A worker re-plans the recipe from headers (it needs the same paths) and checks that its shard
layout is the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergecli.distributed.executor import RayExecutor, Resources
from mergecli.engine.figures import ReportSums
from mergecli.engine.folder_run import folder_run
from mergecli.engine.layout import Shard, index_json
from mergecli.engine.merge import (
    MergePass,
    MergeResult,
    build_report,
    statistics,
    write_merge_reports,
)
from mergecli.engine.outputs import ModelFolder, ModelWriter
from mergecli.engine.plan import MergePlan, plan_merge
from mergecli.engine.runner import Observe, Runner, Timer
from mergecli.engine.store import Store
from mergecli.engine.threads import compute_threads
from mergecli.engine.writer import ShardWriter
from mergecli.errors import MergeError
from mergecli.methods.statistics import (
    LargestMagnitudes,
    Statistic,
    StatValues,
    lanes_total,
)
from mergecli.progress import Progress
from mergecli.recipe import Recipe
from mergecli.sources.checkpoint import INDEX_NAME


@dataclass(frozen=True)
class Unit:
    """What a work unit needs to rebuild the driver's plan: the recipe, device, shard size."""

    recipe: Recipe
    device: str
    shard_size: str | int


@dataclass
class ShardResult:
    """What one work unit wrote and measured."""

    per_tensor: dict[str, Any]
    timer: Timer
    bytes_written: int


def _plan(unit: Unit, shards: list[Shard]) -> MergePlan:
    plan = plan_merge(unit.recipe, unit.device, unit.shard_size)
    assert isinstance(plan.output, ModelFolder)
    mine = [(s.file, s.names) for s in plan.output.shards]
    if mine != [(s.file, s.names) for s in shards]:
        raise MergeError("a worker planned another shard layout: do all nodes see the same inputs?")
    return plan


def _tensors(plan: MergePlan, shard: Shard, merged_only: bool) -> list[Any]:
    names = set(shard.names)
    return [t for t in plan.tensors if t.name in names and (t.merge or not merged_only)]


def _observe_shard(
    unit: Unit, shards: list[Shard], index: int, stats: list[Statistic]
) -> list[Statistic]:
    """One statistics pass over one shard's merged tensors: the statistics as they stand after
    observing them (their histograms are this unit's part)."""
    plan = _plan(unit, shards)
    tensors = _tensors(plan, shards[index], merged_only=True)
    with compute_threads():
        if tensors:
            Runner().run(plan.read_plan(tensors), [Observe(stats)])
    return stats


def _merge_shard(
    unit: Unit, shards: list[Shard], index: int, named: dict[str, Any], folder: Path
) -> ShardResult:
    """Merge one shard's tensors into ``folder/<shard file>``; ``named`` holds the statistics'
    values by handle name (handles are looked up by identity, so this plan's own handles)."""
    plan = _plan(unit, shards)
    stats = StatValues({s.handle: named[s.handle.name] for s in plan.statistics})
    assert isinstance(plan.output, ModelFolder)
    shard = shards[index]
    runner = Runner()
    target = replace(plan.target(), config=plan.output.config)
    writer = ModelWriter(ShardWriter(folder, [shard], plan.output.metadata), folder, target)
    sums, store = ReportSums(), Store(writer, runner.timer)
    with compute_threads():
        read = plan.merge_reads(tensors=_tensors(plan, shard, merged_only=False))
        runner.run(read, [MergePass(plan, stats, runner.timer), sums, store])
    writer.shards.finish()
    per_tensor = {n: {**r, **store.extra.get(n, {})} for n, r in sums.per_tensor().items()}
    return ShardResult(per_tensor, runner.timer, writer.bytes_written)


def _reduce(statistic: Statistic, parts: list[Statistic]) -> None:
    """Add the units' histograms (and, on the first pass, entry counts) into ``statistic``."""
    assert isinstance(statistic, LargestMagnitudes)
    for part in parts:
        assert isinstance(part, LargestMagnitudes)
        if part.shift is not None:
            statistic.bits, statistic.shift = part.bits, part.shift
        if statistic.targets is None:
            statistic.counts = [a + b for a, b in zip(statistic.counts, part.counts, strict=True)]
        for key, hist in part.hist.items():  # lanes summed: workers may count in more or fewer
            total = lanes_total(hist)
            held = statistic.hist.get(key)
            statistic.hist[key] = total.clone() if held is None else lanes_total(held) + total


def distributed_statistics(
    plan: MergePlan, unit: Unit, executor: RayExecutor, progress: Progress
) -> tuple[dict[str, Any], str]:
    """The plan's statistics' values by handle name, pass by pass over the shards as Ray
    tasks when every statistic is a histogram that adds up (else on the driver); and where
    they were gathered (none, shards or driver)."""
    assert isinstance(plan.output, ModelFolder)
    if not plan.statistics:
        return {}, "none"
    if not all(isinstance(s, LargestMagnitudes) for s in plan.statistics):
        statistics(plan, Runner(progress))
        return {s.handle.name: s.value() for s in plan.statistics}, "driver"
    shards = plan.output.shards
    while any(s.wants_pass() for s in plan.statistics):
        active = [s for s in plan.statistics if s.wants_pass()]
        for index in range(len(shards)):
            executor.submit(
                _observe_shard,
                unit,
                shards,
                index,
                active,
                resources=Resources.for_device(unit.device),
            )
        parts = [_value(done) for done in executor.results()]
        for i, statistic in enumerate(active):
            _reduce(statistic, [part[i] for part in parts])
            statistic.end_pass()
    return {s.handle.name: s.value() for s in plan.statistics}, "shards"


def _value(done: Any) -> Any:
    if done.error is not None:
        raise done.error
    return done.value


def run_merge_on_ray(
    plan: MergePlan,
    output: str | Path,
    executor: RayExecutor,
    shard_size: str | int,
    force: bool = False,
    progress: Progress | None = None,
    wait: bool = False,
) -> MergeResult:
    """``run_merge`` with one Ray task per output shard (model folders only); the same files,
    and a report whose ``run.executor`` entry says which node wrote which shard."""
    if not isinstance(plan.output, ModelFolder):
        raise MergeError(
            "--executor ray splits merges into model folders by shard; a LoRA adapter or "
            "task-mask artifact output runs without --executor ray"
        )
    unit = Unit(plan.recipe, str(plan.device), shard_size)
    shards = plan.output.shards
    with folder_run(output, force, wait, plan.bytes_to_write, progress) as run:
        progress = run.runner.progress
        named, gathered = distributed_statistics(plan, unit, executor, progress)
        folder = run.folder
        progress.start("merging (Ray)", len(plan.tensors), 0)
        for index in range(len(shards)):
            executor.submit(
                _merge_shard,
                unit,
                shards,
                index,
                named,
                folder,
                resources=Resources.for_device(unit.device),
            )
        timer, written, per_tensor, tasks = Timer(), 0, {}, []
        for index, done in enumerate(executor.results()):
            part: ShardResult = _value(done)
            per_tensor.update(part.per_tensor)
            for key in ("read", "compute", "write", "bytes_read"):
                setattr(timer, key, getattr(timer, key) + getattr(part.timer, key))
            written += part.bytes_written
            tasks.append({"shard": shards[index].file, **done.where})
            progress.advance(len(shards[index].names), 0)
        per_tensor = {t.name: per_tensor[t.name] for t in plan.tensors if t.name in per_tensor}
        if len(shards) > 1:
            (folder / INDEX_NAME).write_text(index_json(shards))
        replace(plan.target(), config=plan.output.config).copy_model_files(folder)
        report = build_report(
            plan, run.output, per_tensor, timer, written, run.wall, run.started_at
        )
        report["run"]["executor"] = {"kind": "ray", "statistics": gathered, "tasks": tasks}
        write_merge_reports(folder, report=report, plan=plan, lines=[])
    return MergeResult(run.output, report)
