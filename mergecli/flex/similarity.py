"""The similarity pass: one stream over the merged tensors, a Gram matrix of task vectors per block.

Block b's matrix holds ⟨τi^b, τj^b⟩ (all tensors of the block flattened together), accumulated
in float64 tensor by tensor; memory is the merge's (a few tensors read ahead) plus M×M numbers
per block. Cosines, the groups' linkages and Channel Merging's k-means all follow from it.
"""

from __future__ import annotations

import numpy as np
import torch

from mergecli.engine.plan import MergePlan, TensorPlan
from mergecli.engine.read_plan import ReadPlan
from mergecli.engine.runner import Each, Runner
from mergecli.flex.blocks import Block
from mergecli.methods import TensorInputs
from mergecli.ops import gram64


class WholeTensors:
    """FlexMerge reads every tensor whole (its groups are merged tensor by tensor)."""

    merged_rows = False
    copied_rows = False


def flex_reading(plan: MergePlan, tensors: list[TensorPlan]) -> ReadPlan:
    """The reads of ``tensors``, whole, with the base for every merged one (task vectors
    need it)."""
    return plan.read_plan(tensors, WholeTensors(), with_base=True)


def block_grams(plan: MergePlan, blocks: list[Block], runner: Runner) -> list[np.ndarray]:
    """Per block, the M×M float64 Gram matrix of the experts' block task vectors."""
    m = len(plan.experts)
    grams = [torch.zeros(m, m, dtype=torch.float64) for _ in blocks]
    index = {t.name: b for b, block in enumerate(blocks) for t in block.tensors}

    def add(tensor: TensorPlan, inputs: TensorInputs) -> None:
        grams[index[tensor.name]] += gram64(inputs.task_vectors())

    reading = flex_reading(plan, [t for block in blocks for t in block.tensors])
    runner.run(reading, [Each(add)], "similarity pass")
    return [g.numpy() for g in grams]


def cosines(gram: np.ndarray) -> np.ndarray:
    """Cosine similarities from a Gram matrix (0 where a vector is zero)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
