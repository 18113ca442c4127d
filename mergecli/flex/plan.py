"""Plan FlexMerge from headers alone: the merge plan, the blocks, the targets and their range."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from mergecli.engine.layout import parse_size
from mergecli.engine.plan import MergePlan, TensorPlan, plan_merge
from mergecli.errors import RecipeError, did_you_mean
from mergecli.flex.blocks import Block, cut_blocks
from mergecli.flex.consensus import paper_consensus
from mergecli.flex.parts import split_parts
from mergecli.flex.size import SizeModel
from mergecli.recipe import FlexSection, Recipe


@dataclass
class FlexPlan:
    """Everything decided before the similarity pass."""

    merge: MergePlan
    options: FlexSection
    blocks: list[Block]
    shared: list[TensorPlan]
    """Tensors outside the blocks (not merged), stored once."""
    heads: list[TensorPlan]
    """Task-specific heads, not merged, stored once per task."""
    targets: list[float]
    sizes: SizeModel
    shard_bytes: int

    @property
    def tasks(self) -> list[str]:
        return self.merge.expert_names

    @property
    def masks(self) -> bool:
        return self.merge.method.output == "task_masks"

    @property
    def smallest_size(self) -> float:
        """The smaller of the sizes with one group per block and with M (a mask method stores
        two blocks and masks for one group, more than two experts' blocks)."""
        m = len(self.tasks)
        one = [[tuple(range(m))] for _ in self.blocks]
        every: list[list[tuple[int, ...]]] = [[(k,) for k in range(m)] for _ in self.blocks]
        return min(self.sizes.size(one), self.sizes.size(every))

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.options.strategy,
            "method": self.merge.method.name,
            "tasks": self.tasks,
            "granularity": self.options.granularity,
            "linkage": self.options.linkage,
            "order": self.options.order,
            "blocks": len(self.blocks),
            "heads": [t.name for t in self.heads],
            "size_unit": self.sizes.unit,
            "targets": self.targets,
            "size_range": [self.smallest_size, float(len(self.tasks))],
            "model_bytes": self.sizes.model_bytes,
            "bytes_per_pass": self.merge.bytes_per_pass,
            "warnings": self.merge.warnings,
        }


def flex_options(recipe: Recipe, overrides: dict[str, Any]) -> FlexSection:
    """The recipe's ``flex:`` section with the command line's values on top."""
    base = recipe.flex.model_dump(exclude_unset=True) if recipe.flex else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return FlexSection.model_validate({**base, **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(x) for x in error["loc"])
        expected = error.get("ctx", {}).get("expected", "")
        hint = did_you_mean(str(error.get("input")), re.findall(r"'([^']+)'", expected))
        raise RecipeError(f"flex.{key}: {error['msg']}{hint}", key=f"flex.{key}") from None


def plan_flex(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    shard_size: str | int = "5GB",
) -> FlexPlan:
    """Validate a recipe and FlexMerge's options; decide blocks, sizes and targets."""
    options = flex_options(recipe, overrides or {})
    if not recipe.base_model:
        raise RecipeError(
            "base_model: FlexMerge compares task vectors and needs a base model", key="base_model"
        )
    if recipe.output_format != "model":
        raise RecipeError(
            f"output_format: FlexMerge writes its own artifact; '{recipe.output_format}' is for "
            "'mergecli merge'",
            key="output_format",
        )
    recipe, notes = paper_consensus(recipe)
    merge = plan_merge(recipe, device=device, shard_size=shard_size)
    merge.warnings[:0] = notes
    method, m = merge.method, len(merge.experts)
    if m < 2:
        raise RecipeError(
            f"models: FlexMerge needs at least 2 experts, the recipe lists {m}", key="models"
        )
    if options.strategy == "channel" and method.output != "model":
        raise RecipeError(
            f"merge_method: Channel Merging stores one merged block per cluster; '{method.name}' "
            "writes task masks (use strategy: flexmerge)",
            key="merge_method",
        )
    parts = split_parts(merge, options.heads)
    blocks = cut_blocks(parts.blocked, options.granularity)
    shared_bytes = sum(t.numel * t.out_dtype.itemsize for t in parts.shared)
    head_bytes = m * sum(t.numel * t.out_dtype.itemsize for t in parts.heads)
    sizes = SizeModel(
        blocks,
        0 if parts.adapters else shared_bytes,
        method.output != "model",
        head_bytes + (shared_bytes if parts.adapters else 0),
        "adapter modules" if parts.adapters else "model",
    )
    plan = FlexPlan(
        merge, options, blocks, parts.shared, parts.heads, [], sizes, parse_size(shard_size)
    )
    plan.targets = check_targets(plan, options.sizes or [])
    return plan


def check_targets(plan: FlexPlan, targets: list[float]) -> list[float]:
    """Targets in range, each once, in increasing order; one-line errors otherwise."""
    if not targets:
        raise RecipeError("flex: no target size: give --size, --sizes or flex.sizes", key="--size")
    m = len(plan.tasks)
    low = plan.smallest_size
    for target in targets:
        if plan.options.strategy == "channel":
            if float(target) != int(target) or not 1 <= target <= m:
                raise RecipeError(
                    f"--size {target:g}: Channel Merging makes whole sizes only, 1 to {m} "
                    "(K clusters per block)",
                    key="--size",
                )
        elif not low * (1 - 1e-9) <= target <= m:
            raise RecipeError(
                f"--size {target:g}: out of range; {plan.merge.method.name} with {m} experts "
                f"reaches sizes from {low:.4g} to {m}",
                key="--size",
            )
    return sorted(set(float(t) for t in targets))


def without_untouched(plan: FlexPlan, grams: list[np.ndarray]) -> tuple[FlexPlan, list[np.ndarray]]:
    """The plan without the blocks that no expert changes (every block task vector zero in the
    similarity pass; full checkpoints' frozen parts): their tensors are stored once, as copies
    of the base, and counted once (outside the unit with adapter experts)."""
    touched = [bool(np.any(np.diag(g) > 0)) for g in grams]
    if all(touched):
        return plan, grams
    if not any(touched):
        raise RecipeError(
            "models: no expert changes any merged tensor (every task vector is 0)", key="models"
        )
    moved = [
        replace(t, merge=False)
        for block, kept in zip(plan.blocks, touched, strict=True)
        if not kept
        for t in block.tensors
    ]
    nbytes = sum(t.numel * t.out_dtype.itemsize for t in moved)
    adapters = plan.sizes.unit != "model"
    sizes = replace(
        plan.sizes,
        blocks=[b for b, kept in zip(plan.blocks, touched, strict=True) if kept],
        shared_bytes=plan.sizes.shared_bytes + (0 if adapters else nbytes),
        outside_bytes=plan.sizes.outside_bytes + (nbytes if adapters else 0),
    )
    kept_grams = [g for g, kept in zip(grams, touched, strict=True) if kept]
    return replace(plan, blocks=sizes.blocks, shared=plan.shared + moved, sizes=sizes), kept_grams
