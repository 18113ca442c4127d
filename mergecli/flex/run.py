"""Run FlexMerge: one similarity pass, one merge order, then one merge pass writing every size.

Distinct groups are merged once per tensor and written into every size that holds them, so
``--sizes 1,1.5,2`` reads the inputs twice in all (similarity pass and merge pass) whatever the
number of sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.engine.folder_run import folder_run
from mergecli.engine.merge import merge_tensor
from mergecli.engine.output import check_space
from mergecli.engine.outputs import Target
from mergecli.engine.plan import TensorPlan
from mergecli.engine.runner import Each, Piece, Runner, WriteQueue
from mergecli.engine.task_artifact import pack_mask
from mergecli.errors import RecipeError
from mergecli.flex.artifact import FlexArtifact, FlexWriter, Stored
from mergecli.flex.blocks import Block
from mergecli.flex.channel import channel_partition
from mergecli.flex.order import Group, Partition, Step, merge_order, partition_after
from mergecli.flex.plan import FlexPlan, without_untouched
from mergecli.flex.report import order_rows, size_report, write_size_reports
from mergecli.flex.similarity import block_grams, flex_reading
from mergecli.flex.size import steps_for
from mergecli.methods import Params, TaskMasks, TensorInputs
from mergecli.methods.statistics import StatValues
from mergecli.progress import Progress


@dataclass
class FlexState:
    """The groups deployed for one target size."""

    target: float
    partition: Partition
    size: float
    steps: int | None
    """Steps of the merge order applied (None for Channel Merging)."""


@dataclass
class SizeResult:
    """One written size: its folder, achieved size and report."""

    target: float
    size: float
    folder: Path
    report: dict[str, Any]


@dataclass
class FlexResult:
    """What ``run_flex`` wrote: one result per size, the merge order table, the similarity
    pass's Gram matrices and the timings."""

    output: Path
    order: list[dict[str, Any]]
    results: list[SizeResult]
    grams: list[np.ndarray]
    timing: dict[str, float]


def decide_states(plan: FlexPlan, grams: list[np.ndarray]) -> tuple[list[Step], list[FlexState]]:
    """The merge order and the state of every target (or Channel Merging's clusterings)."""
    m, seed = len(plan.tasks), plan.merge.recipe.seed
    if plan.options.strategy == "channel":
        states = []
        for target in plan.targets:
            partition = channel_partition(grams, int(target), seed)
            states.append(FlexState(target, partition, plan.sizes.size(partition), None))
        return [], states
    steps = merge_order(grams, plan.options.linkage, plan.options.order, seed)
    sizes = plan.sizes.sizes_along(steps, m)
    states = []
    for target in plan.targets:
        count = steps_for(target, sizes)
        if count is None:
            raise RecipeError(
                f"--size {target:g}: the merge order never gets that small (smallest "
                f"{min(sizes):.4g})",
                key="--size",
            )
        partition = partition_after(steps, count, len(plan.blocks), m)
        states.append(FlexState(target, partition, sizes[count], count))
    return steps, states


def size_folder(target: float) -> str:
    return f"size-{target:g}"


def run_flex(
    plan: FlexPlan,
    output: str | Path,
    force: bool = False,
    progress: Progress | None = None,
    similarity: Callable[[FlexPlan], list[np.ndarray]] | None = None,
    wait: bool = False,
) -> FlexResult:
    """Write one artifact per target into ``output`` (the artifact itself for one target, one
    ``size-<target>`` folder per target otherwise), atomically, under the output's lock.
    ``similarity`` computes the blocks' Gram matrices instead of the similarity pass here (on a
    Ray cluster)."""
    results = []
    merge = plan.merge
    target = Target(
        merge.out_dtype, merge.reference.path, merge.tokenizer_folder, vocabulary=merge.vocabulary
    )
    with folder_run(output, force, wait, progress=progress) as run:
        root, runner, started = run.folder, run.runner, run.started
        grams = similarity(plan) if similarity else block_grams(plan.merge, plan.blocks, runner)
        plan, grams = without_untouched(plan, grams)
        similarity_s = time.perf_counter() - started
        steps, states = decide_states(plan, grams)
        order_s = time.perf_counter() - started - similarity_s
        outputs = [
            FlexArtifact(
                plan.shared,
                plan.heads,
                plan.blocks,
                state.partition,
                plan.masks,
                plan.shard_bytes,
                plan.tasks,
                {
                    "strategy": plan.options.strategy,
                    "method": plan.merge.method.name,
                    "parameters": plan.merge.recipe.parameters,
                    "granularity": plan.options.granularity,
                    "linkage": plan.options.linkage,
                    "order": plan.options.order,
                    "target": state.target,
                    "size": state.size,
                    "size_unit": plan.sizes.unit,
                    "model_bytes": plan.sizes.model_bytes,
                    "sized_bytes": plan.sizes.stored_bytes(state.partition),
                },
            )
            for state in states
        ]
        check_space(run.output, sum(plan.sizes.artifact_bytes(s.partition) for s in states))
        folders = [root] if len(states) == 1 else [root / size_folder(s.target) for s in states]
        writers = []
        for folder, artifact in zip(folders, outputs, strict=True):
            folder.mkdir(exist_ok=True)
            writers.append(artifact.open(folder, target))
        merge_pass(plan, states, writers, runner)
        rows = order_rows(plan, steps)
        timing = {
            "similarity_s": similarity_s,
            "order_s": order_s,
            "merge_s": time.perf_counter() - started - similarity_s - order_s,
        }
        for folder, state, writer in zip(folders, states, writers, strict=True):
            section, _ = writer.finish({})
            report = size_report(plan, section["manifest"], rows, state.steps, timing)
            final = run.output if folder == root else run.output / folder.name
            results.append(SizeResult(state.target, state.size, final, report))
        write_size_reports([(f, r.report) for f, r in zip(folders, results, strict=True)])
    timing["wall_s"] = run.wall
    return FlexResult(run.output, rows, results, grams, timing)


def expert_tensors(inputs: TensorInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each expert's weights and task vector (the weights first: they are then exact)."""
    return inputs.weights(), inputs.task_vectors()


def group_inputs(
    plan: FlexPlan,
    inputs: TensorInputs,
    weights: list[torch.Tensor],
    tvs: list[torch.Tensor],
    group: Group,
) -> TensorInputs:
    """The inputs of one tensor restricted to a group's experts (seeds keep recipe indices)."""
    return TensorInputs(
        name=inputs.name,
        base=inputs.base if plan.merge.uses_base else None,
        expert_weights=[weights[i] for i in group],
        expert_deltas=[tvs[i] for i in group],
        seed=inputs.seed,
        layer=inputs.layer,
        num_layers=inputs.num_layers,
        offset=inputs.offset,
        expert_ids=list(group),
    )


def group_params(plan: FlexPlan, params: Params, group: Group) -> Params:
    """A tensor's parameters with per-model values restricted to the group's experts."""
    method = plan.merge.method
    out = dict(params)
    for p in method.params:
        if p.per_model:
            out[p.name] = [params[p.name][i] for i in group]
    return out


def group_statistics(
    plan: FlexPlan, block: Block, groups: list[Group], runner: Runner
) -> tuple[dict[Group, StatValues], dict[Group, dict[str, Params]]]:
    """A method's whole-model statistics, gathered over the block for each multi-member group
    (FlexMerge applies the method block by block); also the parameters they settled."""
    make = plan.merge.method.statistics
    assert make is not None
    params = {g: {t.name: group_params(plan, t.params, g) for t in block.tensors} for g in groups}
    # tensors are read whole here: a per-tensor statistic comes from the tensor itself
    stats = {
        g: [s for s in make(params[g], plan.merge.warnings.append) if s.tensors is None]
        for g in groups
    }
    quiet = Runner(timer=runner.timer)
    while any(s.wants_pass() for ss in stats.values() for s in ss):
        active = {g: [s for s in ss if s.wants_pass()] for g, ss in stats.items()}

        def observe(
            tensor: TensorPlan, inputs: TensorInputs, active: dict[Group, list] = active
        ) -> None:
            weights, tvs = expert_tensors(inputs)
            for g, ss in active.items():
                for statistic in ss:
                    statistic.observe(group_inputs(plan, inputs, weights, tvs, g))

        quiet.run(flex_reading(plan.merge, block.tensors), [Each(observe)])
        for ss in active.values():
            for statistic in ss:
                statistic.end_pass()
    return {g: StatValues.of(ss) for g, ss in stats.items()}, params


def tensor_values(
    plan: FlexPlan,
    tensor: TensorPlan,
    inputs: TensorInputs,
    groups: list[Group],
    stats: dict[Group, StatValues],
    params: dict[Group, dict[str, Params]],
) -> tuple[Stored, dict[Group, list[float]]]:
    """What every group of the tensor's block stores, computed once for all sizes."""
    weights, tvs = expert_tensors(inputs)
    dtype = tensor.out_dtype
    stored: Stored = {}
    scales: dict[Group, list[float]] = {}
    for group in groups:
        if len(group) == 1:
            stored["weights", group, None] = weights[group[0]].to(dtype)
            continue
        p = (
            params[group][tensor.name]
            if group in params
            else group_params(plan, tensor.params, group)
        )
        merged = merge_tensor(
            plan.merge,
            replace(tensor, params=p),
            group_inputs(plan, inputs, weights, tvs, group),
            stats.get(group, StatValues()),
        ).value
        if isinstance(merged, TaskMasks):
            assert inputs.base is not None
            stored["base", None, None] = inputs.base.to(dtype)
            stored["unified", group, None] = merged.unified.to(dtype)
            for mask, t in zip(merged.masks, group, strict=True):
                stored["mask", group, t] = pack_mask(mask)
            if merged.scales is not None:
                scales[group] = [float(s) for s in merged.scales]
        else:
            stored["weights", group, None] = merged.to(dtype)
    return stored, scales


class GroupMerge:
    """FlexMerge's merge pass: each block tensor's distinct groups merged once, written into
    every size; tensors outside the blocks and every task's heads copied into every size."""

    def __init__(
        self,
        plan: FlexPlan,
        groups: dict[str, list[Group]],
        writers: list[FlexWriter],
        runner: Runner,
    ) -> None:
        self.plan = plan
        self.groups = groups
        """The distinct groups of each block tensor's block, over every size."""
        self.writers = writers
        self.heads = {t.name for t in plan.heads}
        self.timer = runner.timer
        self.stats: dict[Group, StatValues] = {}
        self.params: dict[Group, dict[str, Params]] = {}

    def piece(self, piece: Piece, queue: WriteQueue) -> None:
        tensor = piece.tensor
        if piece.inputs is None:
            assert piece.raw is not None
            raw = piece.raw.to(tensor.out_dtype)
            queue.write(self.write, tensor.name, ({("shared", None, None): raw}, {}))
            return
        if tensor.name in self.heads:
            weights = piece.inputs.weights()
            heads = {("head", None, t): w.to(tensor.out_dtype) for t, w in enumerate(weights)}
            queue.write(self.write, tensor.name, (heads, {}))
            return
        start = time.perf_counter()
        groups = self.groups[tensor.name]
        values = tensor_values(self.plan, tensor, piece.inputs, groups, self.stats, self.params)
        self.timer.compute += time.perf_counter() - start
        queue.write(self.write, tensor.name, values)

    def write(self, name: str, values: tuple[Stored, dict[Group, list[float]]]) -> None:
        for writer in self.writers:
            writer.write(name, values)


def merge_pass(
    plan: FlexPlan, states: list[FlexState], writers: list[FlexWriter], runner: Runner
) -> None:
    """Stream every tensor once, merge each distinct group once, write every size (every
    task's head as it is); with a method's statistics, block by block, each block's statistics
    gathered first."""
    groups = {
        t.name: sorted({g for state in states for g in state.partition[b]})
        for b, block in enumerate(plan.blocks)
        for t in block.tensors
    }
    merge = GroupMerge(plan, groups, writers, runner)
    tensors = [t for block in plan.blocks for t in block.tensors]
    runner.progress.start(
        "merging",
        len(plan.shared) + len(plan.heads) + len(tensors),
        flex_reading(plan.merge, tensors).nbytes,
    )
    runner.run(flex_reading(plan.merge, plan.shared), [merge])
    runner.run(flex_reading(plan.merge, plan.heads), [merge])
    if plan.merge.method.statistics is None:
        runner.run(flex_reading(plan.merge, tensors), [merge])
        return
    for block in plan.blocks:
        multi = [g for g in groups[block.tensors[0].name] if len(g) > 1]
        merge.stats, merge.params = group_statistics(plan, block, multi, runner)
        runner.run(flex_reading(plan.merge, block.tensors), [merge])
