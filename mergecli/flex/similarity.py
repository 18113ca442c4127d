"""The similarity pass: one stream over the merged tensors, a Gram matrix of task vectors per block.

Block b's matrix holds ⟨τi^b, τj^b⟩ (all tensors of the block flattened together), accumulated
in float64 tensor by tensor; memory is the merge's (a few tensors read ahead) plus M×M numbers
per block. Cosines, the groups' linkages and Channel Merging's k-means all follow from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from mergecli.engine.plan import MergePlan, TensorPlan
from mergecli.engine.stream import Timer, stream_inputs
from mergecli.flex.blocks import Block
from mergecli.methods import TensorInputs
from mergecli.ops import gram64
from mergecli.progress import Progress


def with_base(plan: MergePlan) -> MergePlan:
    """The plan reading the base for every merged tensor (task vectors need it)."""
    return replace(plan, method=replace(plan.method, base="required"))


def block_inputs(
    plan: MergePlan, blocks: list[Block], timer: Timer, per_block: bool
) -> Iterator[tuple[int, TensorPlan, TensorInputs]]:
    """Every block tensor's inputs (with the base), in block order; one stream in all, or one
    per block (when statistics are gathered between blocks)."""
    reading = with_base(plan)
    index = {t.name: b for b, block in enumerate(blocks) for t in block.tensors}
    runs = (
        [block.tensors for block in blocks]
        if per_block
        else [[t for x in blocks for t in x.tensors]]
    )
    for tensors in runs:
        for tensor, inputs in stream_inputs(reading, tensors, timer):
            assert isinstance(inputs, TensorInputs)
            yield index[tensor.name], tensor, inputs


def reading_bytes(plan: MergePlan, blocks: list[Block]) -> dict[str, int]:
    """Bytes read per block tensor: the base's and every expert's."""
    assert plan.base is not None
    sources = [plan.base, *plan.experts]
    return {
        t.name: sum(src.info(t.name).nbytes for src in sources)
        for block in blocks
        for t in block.tensors
    }


def block_grams(
    plan: MergePlan, blocks: list[Block], timer: Timer, progress: Progress
) -> list[np.ndarray]:
    """Per block, the M×M float64 Gram matrix of the experts' block task vectors."""
    m = len(plan.experts)
    grams = [torch.zeros(m, m, dtype=torch.float64) for _ in blocks]
    sizes = reading_bytes(plan, blocks)
    progress.start("similarity pass", len(sizes), sum(sizes.values()))
    for b, tensor, inputs in block_inputs(plan, blocks, timer, per_block=False):
        grams[b] += gram64(inputs.task_vectors())
        progress.advance(1, sizes[tensor.name])
    return [g.numpy() for g in grams]


def cosines(gram: np.ndarray) -> np.ndarray:
    """Cosine similarities from a Gram matrix (0 where a vector is zero)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
