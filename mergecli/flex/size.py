"""The deployed size of a FlexMerge state, in units of one model (of one adapter's modules).

size = bytes of the tensors an artifact stores / bytes of one model's tensors, both in the
output dtype, leaving out task-specific heads (stored once per task, as in the paper). Tensors
outside the blocks (buffers, tensors no expert changes) are stored once. With PEFT adapters as
experts the unit is the adapter modules (FlexMerge's Fig. 4a): one copy of the blocks, the base
tensors the adapters change; the tensors no adapter changes are the frozen base, stored once and
outside the unit. Weight-only methods store one copy of a block per group. Mask methods (emr,
tall_masks) store a singleton group's block as the expert's weights, and in a block with a
multi-member group the base block once plus, per multi-member group, the unified block and one
bit per element per member (the per-task scalars live in the manifest and are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergecli.flex.blocks import Block
from mergecli.flex.order import Group, Partition, Step

SLACK = 1e-9
"""Relative tolerance when comparing a size with a target."""


@dataclass
class SizeModel:
    blocks: list[Block]
    shared_bytes: int
    """Bytes of the tensors outside the blocks, stored once, counted in the unit."""
    masks: bool
    """Whether the method stores masks (a task-mask method) rather than merged weights."""
    outside_bytes: int = 0
    """Bytes stored but outside the unit: the heads of every task, and with adapter experts the
    tensors no adapter changes."""
    unit: str = "model"
    """``model``, or ``adapter modules`` when every expert is a PEFT adapter."""

    @property
    def model_bytes(self) -> int:
        """Bytes of one unit: one model (without its head), or one copy of the adapter
        modules."""
        return self.shared_bytes + sum(b.nbytes for b in self.blocks)

    def block_bytes(self, b: int, groups: list[Group]) -> int:
        """Bytes stored for block b with these groups."""
        block = self.blocks[b]
        if not self.masks:
            return len(groups) * block.nbytes
        multi = [g for g in groups if len(g) > 1]
        singles = len(groups) - len(multi)
        stored = singles * block.nbytes + (block.nbytes if multi else 0)
        return stored + sum(block.nbytes + len(g) * block.mask_bytes for g in multi)

    def stored_bytes(self, partition: Partition) -> int:
        """Bytes of the sized part of an artifact."""
        return self.shared_bytes + sum(
            self.block_bytes(b, groups) for b, groups in enumerate(partition)
        )

    def artifact_bytes(self, partition: Partition) -> int:
        """Bytes of every tensor an artifact stores."""
        return self.stored_bytes(partition) + self.outside_bytes

    def size(self, partition: Partition) -> float:
        return self.stored_bytes(partition) / self.model_bytes

    def sizes_along(self, steps: list[Step], m: int) -> list[float]:
        """The size after 0, 1, ..., len(steps) steps of a merge order."""
        groups: Partition = [[(k,) for k in range(m)] for _ in self.blocks]
        per_block = [self.block_bytes(b, g) for b, g in enumerate(groups)]
        total = self.shared_bytes + sum(per_block)
        sizes = [total / self.model_bytes]
        for step in steps:
            merged = tuple(sorted(step.a + step.b))
            groups[step.block] = [g for g in groups[step.block] if g not in (step.a, step.b)]
            groups[step.block].append(merged)
            new = self.block_bytes(step.block, groups[step.block])
            total += new - per_block[step.block]
            per_block[step.block] = new
            sizes.append(total / self.model_bytes)
        return sizes


def steps_for(target: float, sizes: list[float]) -> int | None:
    """The number of steps of the first state whose size is ≤ target (None: never)."""
    return next((k for k, s in enumerate(sizes) if s <= target * (1 + SLACK)), None)
