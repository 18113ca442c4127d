"""Run FlexMerge: one similarity pass, one merge order, then one merge pass writing every size.

Distinct groups are merged once per tensor and written into every size that holds them, so
``--sizes 1,1.5,2`` reads the inputs twice in all (similarity pass and merge pass) whatever the
number of sizes.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.engine.merge import WRITE_QUEUE, check_merged, merge_tensor, tokenizer_folder
from mergecli.engine.output import atomic_folder, check_output, check_space, copy_model_files
from mergecli.engine.plan import TensorPlan
from mergecli.engine.stream import Timer, stream_inputs
from mergecli.engine.task_artifact import pack_mask
from mergecli.errors import MergeError
from mergecli.flex.artifact import FlexWriter, Stored
from mergecli.flex.blocks import Block
from mergecli.flex.channel import channel_partition
from mergecli.flex.order import Group, Partition, Step, merge_order, partition_after
from mergecli.flex.plan import FlexPlan
from mergecli.flex.report import order_rows, size_report, write_size_reports
from mergecli.flex.similarity import block_grams, block_inputs, reading_bytes, with_base
from mergecli.flex.size import steps_for
from mergecli.methods import Params, TaskMasks, TensorInputs
from mergecli.progress import NullProgress, Progress


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
            raise MergeError(
                f"--size {target:g}: the merge order never gets that small (smallest "
                f"{min(sizes):.4g})"
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
    wait: bool = False,
) -> FlexResult:
    """Write one artifact per target into ``output`` (the artifact itself for one target, one
    ``size-<target>`` folder per target otherwise), atomically, under the output's lock."""
    progress = progress or NullProgress()
    output = Path(output).resolve()
    check_output(output, force)
    timer, started = Timer(), time.perf_counter()
    results = []
    with atomic_folder(output, force, wait) as root:
        grams = block_grams(plan.merge, plan.blocks, timer, progress)
        similarity_s = time.perf_counter() - started
        steps, states = decide_states(plan, grams)
        order_s = time.perf_counter() - started - similarity_s
        check_space(output, sum(plan.sizes.stored_bytes(s.partition) for s in states))
        folders = [root] if len(states) == 1 else [root / size_folder(s.target) for s in states]
        writers = []
        for folder, state in zip(folders, states, strict=True):
            folder.mkdir(exist_ok=True)
            writers.append(
                FlexWriter(
                    folder, plan.shared, plan.blocks, state.partition, plan.masks, plan.shard_bytes
                )
            )
        merge_pass(plan, states, writers, timer, progress)
        rows = order_rows(plan, steps)
        timing = {
            "similarity_s": similarity_s,
            "order_s": order_s,
            "merge_s": time.perf_counter() - started - similarity_s - order_s,
        }
        for folder, state, writer in zip(folders, states, writers, strict=True):
            info = {
                "strategy": plan.options.strategy,
                "method": plan.merge.method.name,
                "parameters": plan.merge.recipe.parameters,
                "granularity": plan.options.granularity,
                "linkage": plan.options.linkage,
                "order": plan.options.order,
                "target": state.target,
                "size": state.size,
                "model_bytes": plan.sizes.model_bytes,
            }
            manifest = writer.finish(plan.tasks, info)
            copy_model_files(
                plan.merge.reference.path,
                tokenizer_folder(plan.merge),
                folder,
                plan.merge.out_dtype,
            )
            report = size_report(plan, manifest, rows, state.steps, timing)
            final = output if folder == root else output / folder.name
            results.append(SizeResult(state.target, state.size, final, report))
        write_size_reports([(f, r.report) for f, r in zip(folders, results, strict=True)])
    progress.stop()
    timing["wall_s"] = time.perf_counter() - started
    return FlexResult(output, rows, results, grams, timing)


def expert_tensors(inputs: TensorInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each expert's weights and task vector (neither modifies the other)."""
    base = inputs.base
    assert base is not None
    weights = [
        w if w is not None else base + d
        for w, d in zip(inputs.expert_weights, inputs.expert_deltas, strict=True)
    ]
    tvs = [
        d if d is not None else w - base for w, d in zip(weights, inputs.expert_deltas, strict=True)
    ]
    return weights, tvs


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
    plan: FlexPlan, block: Block, groups: list[Group], timer: Timer
) -> tuple[dict[Group, dict[str, Any]], dict[Group, dict[str, Params]]]:
    """A method's whole-model statistics, gathered over the block for each multi-member group
    (FlexMerge applies the method block by block); also the parameters they settled."""
    make = plan.merge.method.statistics
    assert make is not None
    params = {g: {t.name: group_params(plan, t.params, g) for t in block.tensors} for g in groups}
    stats = {g: make(params[g], plan.merge.warnings.append) for g in groups}
    while any(s.wants_pass() for ss in stats.values() for s in ss):
        active = {g: [s for s in ss if s.wants_pass()] for g, ss in stats.items()}
        for _, _, inputs in block_inputs(plan.merge, [block], timer, per_block=True):
            weights, tvs = expert_tensors(inputs)
            for g, ss in active.items():
                for statistic in ss:
                    statistic.observe(group_inputs(plan, inputs, weights, tvs, g))
        for ss in active.values():
            for statistic in ss:
                statistic.end_pass()
    return {g: {s.key: s.value() for s in ss} for g, ss in stats.items()}, params


def tensor_values(
    plan: FlexPlan,
    tensor: TensorPlan,
    inputs: TensorInputs,
    groups: list[Group],
    stats: dict[Group, dict[str, Any]],
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
            stats.get(group, {}),
        )
        check_merged(plan.merge, tensor, merged)
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


def merge_pass(
    plan: FlexPlan,
    states: list[FlexState],
    writers: list[FlexWriter],
    timer: Timer,
    progress: Progress,
) -> None:
    """Stream every tensor once, merge each distinct group once, write every size."""
    reading = with_base(plan.merge)
    sizes = reading_bytes(plan.merge, plan.blocks)
    progress.start("merging", len(plan.shared) + len(sizes), sum(sizes.values()))
    for tensor, raw in stream_inputs(reading, plan.shared, timer):
        assert isinstance(raw, torch.Tensor)
        for writer in writers:
            writer.write(tensor.name, {("shared", None, None): raw}, {})
        progress.advance(1, raw.nbytes)
    groups = [
        sorted({g for state in states for g in state.partition[b]}) for b in range(len(plan.blocks))
    ]
    with_stats = plan.merge.method.statistics is not None
    stats: dict[Group, dict[str, Any]] = {}
    params: dict[Group, dict[str, Params]] = {}
    current = -1
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-write") as pool:
        pending: deque[Future[None]] = deque()
        for b, tensor, inputs in block_inputs(plan.merge, plan.blocks, timer, per_block=with_stats):
            if with_stats and b != current:
                current = b
                multi = [g for g in groups[b] if len(g) > 1]
                stats, params = group_statistics(plan, plan.blocks[b], multi, timer)
            start = time.perf_counter()
            stored, scales = tensor_values(plan, tensor, inputs, groups[b], stats, params)
            timer.compute += time.perf_counter() - start
            pending.append(pool.submit(_write, writers, tensor.name, stored, scales, timer))
            while len(pending) > WRITE_QUEUE:
                pending.popleft().result()
            progress.advance(1, sizes[tensor.name])
        for future in pending:
            future.result()


def _write(
    writers: list[FlexWriter],
    name: str,
    stored: Stored,
    scales: dict[Group, list[float]],
    timer: Timer,
) -> None:
    start = time.perf_counter()
    for writer in writers:
        writer.write(name, stored, scales)
    timer.write += time.perf_counter() - start
