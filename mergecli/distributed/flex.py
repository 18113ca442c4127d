"""FlexMerge's similarity pass on a Ray cluster: one task per block.

Each task re-plans the FlexMerge recipe from headers, runs the similarity pass (the runner over
the read plan of that block's tensors) and returns the block's Gram matrix; the driver lists
them in block order and goes on as locally (merge order, merge pass, artifacts). A block's
Gram matrix sums the same tensors in the same order either way, so the artifacts are
byte-identical to a local run's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergecli.distributed.executor import RayExecutor, Resources
from mergecli.engine.runner import Runner
from mergecli.engine.threads import compute_threads
from mergecli.errors import MergeError
from mergecli.flex.plan import FlexPlan, plan_flex
from mergecli.flex.similarity import block_grams
from mergecli.recipe import Recipe


@dataclass(frozen=True)
class FlexUnit:
    """What a task needs to rebuild the driver's FlexMerge plan."""

    recipe: Recipe
    overrides: dict[str, Any]
    device: str
    shard_size: str | int


def _block_gram(unit: FlexUnit, index: int, names: list[str]) -> np.ndarray:
    plan = plan_flex(unit.recipe, unit.overrides, unit.device, unit.shard_size)
    block = plan.blocks[index]
    if [t.name for t in block.tensors] != names:
        raise MergeError("a worker planned other blocks: do all nodes see the same inputs?")
    with compute_threads():
        return block_grams(plan.merge, [block], Runner())[0]


def similarity_on_ray(
    executor: RayExecutor,
    recipe: Recipe,
    overrides: dict[str, Any],
    device: str = "cpu",
    shard_size: str | int = "5GB",
) -> Callable[[FlexPlan], list[np.ndarray]]:
    """A ``similarity`` for ``run_flex`` of ``plan_flex(recipe, overrides, device,
    shard_size)``: the blocks' Gram matrices as Ray tasks."""
    unit = FlexUnit(recipe, overrides, device, shard_size)

    def similarity(plan: FlexPlan) -> list[np.ndarray]:
        for index, block in enumerate(plan.blocks):
            names = [t.name for t in block.tensors]
            executor.submit(
                _block_gram, unit, index, names, resources=Resources.for_device(unit.device)
            )
        grams = []
        for done in executor.results():
            if done.error is not None:
                raise done.error
            grams.append(done.value)
        return grams

    return similarity
