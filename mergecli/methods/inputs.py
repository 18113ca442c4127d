"""What a merging method sees for one tensor: the base, the experts and their task vectors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mergecli.methods.philox import keep_mask


def seed_for(seed: int, expert: int, tensor_name: str) -> int:
    """A 63-bit key depending only on the recipe seed, the expert's index and the tensor name."""
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_chunks(shape: tuple[int, ...], limit: int) -> list[tuple[int, int]] | None:
    """Row ranges ``start:stop`` of about ``limit`` entries each that cover a tensor of
    ``shape``; None when it has fewer than two dimensions or at most ``limit`` entries."""
    numel = math.prod(shape)
    if len(shape) < 2 or numel <= limit:
        return None
    rows = shape[0]
    step = max(1, limit * rows // numel)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


@dataclass
class TensorInputs:
    """The inputs of one tensor, in the compute dtype on the compute device.

    Experts arrive either as full weights (checkpoints) or as task vectors (adapters); the
    accessors convert on demand and cache. The engine owns these tensors: a method may read
    them but must not modify the tensors the accessors return.
    """

    name: str
    base: torch.Tensor | None
    expert_weights: list[torch.Tensor | None]
    expert_deltas: list[torch.Tensor | None]
    seed: int = 0
    layer: int | None = None
    num_layers: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    kept: list[float | None] = field(default_factory=list)
    offset: int = 0
    """Index of this piece's first entry in the whole tensor (row-major): random masks are
    drawn by entry index, so a row chunk gets its part of the whole tensor's mask."""
    expert_ids: list[int] | None = None
    """The experts' indices in the recipe when these inputs hold a subset of them (FlexMerge's
    groups): seeds follow the recipe's index, not the position in the subset."""

    def __post_init__(self) -> None:
        if not self.kept:
            self.kept = [None] * len(self.expert_weights)

    @property
    def num_experts(self) -> int:
        return len(self.expert_weights)

    def task_vectors(self) -> list[torch.Tensor]:
        """τt = θt − θ0 for every expert (computed in place from the expert weights once)."""
        if self.base is None:
            raise ValueError(f"{self.name}: task vectors need a base model")
        for t, delta in enumerate(self.expert_deltas):
            if delta is None:
                weight = self.expert_weights[t]
                assert weight is not None
                self.expert_deltas[t] = weight.sub_(self.base)
                self.expert_weights[t] = None
        return [d for d in self.expert_deltas if d is not None]

    def weights(self) -> list[torch.Tensor]:
        """θt for every expert (recomputed as θ0 + τt where only the task vector is held)."""
        for t, weight in enumerate(self.expert_weights):
            if weight is None:
                delta = self.expert_deltas[t]
                assert delta is not None and self.base is not None
                self.expert_weights[t] = self.base + delta
        return [w for w in self.expert_weights if w is not None]

    def rows(self, start: int, stop: int) -> TensorInputs:
        """The same inputs restricted to rows ``start:stop`` (views; generators shared)."""

        def part(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            return [None if x is None else x[start:stop] for x in tensors]

        return TensorInputs(
            name=self.name,
            base=None if self.base is None else self.base[start:stop],
            expert_weights=part(self.expert_weights),
            expert_deltas=part(self.expert_deltas),
            seed=self.seed,
            layer=self.layer,
            num_layers=self.num_layers,
            stats=self.stats,
            offset=self.offset + start * math.prod(self._shape()[1:]),
            expert_ids=self.expert_ids,
        )

    def _shape(self) -> tuple[int, ...]:
        ref = self.base if self.base is not None else self.weights()[0]
        return tuple(ref.shape)

    def bernoulli_mask(self, expert: int, keep: float | torch.Tensor) -> torch.Tensor:
        """A keep-mask (``keep``: a probability, or one per entry) drawn with Philox keyed by
        (recipe seed, expert index, tensor name) at this piece's entry offset, on the CPU and
        moved to the inputs' device."""
        index = self.expert_ids[expert] if self.expert_ids is not None else expert
        key = seed_for(self.seed, index, self.name)
        ref = self.base if self.base is not None else self.weights()[0]
        return keep_mask(key, self.offset, tuple(ref.shape), keep).to(ref.device)
