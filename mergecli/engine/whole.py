"""Whole tensors into memory through the runner, for the forward passes that need a model's
weights at once (evaluating a model folder, the MoE gates' hidden states, serving a FlexMerge
artifact): every tensor read is checked for NaN/Inf like a merge's inputs."""

from __future__ import annotations

import torch

from mergecli.engine.outputs import InMemory
from mergecli.engine.read_plan import ReadPlan, TensorPlan
from mergecli.engine.runner import Runner
from mergecli.engine.store import Store
from mergecli.sources.readable import Readable


def read_whole(source: Readable, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors ``names`` of ``source``, as stored, by name."""
    tensors = [
        TensorPlan(n, source.info(n).shape, source.info(n).dtype, merge=False) for n in names
    ]
    memory, runner = InMemory(), Runner()
    runner.run(ReadPlan.copies(tensors, source), [Store(memory, runner.timer)])
    return memory.state
