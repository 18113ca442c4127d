"""What a merging method sees for one tensor: the base, the experts and their task vectors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from mergecli.methods.statistics import StatValues


def seed_for(seed: int, expert: int, tensor_name: str) -> int:
    """A 63-bit seed depending only on the recipe seed, the expert's index and the tensor name."""
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
    stats: StatValues = field(default_factory=lambda: StatValues())
    """The whole-model statistics the method declared, by handle."""
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    """The experts' torch generators (``conventions: mergekit`` masks), shared by the row
    chunks of one tensor: chunk after chunk continues the whole tensor's random stream."""
    offset: int = 0
    """Index of this piece's first entry in the whole tensor (row-major): Philox masks are
    drawn by entry index, so a row chunk gets its part of the whole tensor's mask."""
    expert_ids: list[int] | None = None
    """The experts' indices in the recipe when these inputs hold a subset of them (FlexMerge's
    groups): seeds follow the recipe's index, not the position in the subset."""
    as_stored: bool = False
    """bfloat16 tensors are handed on as stored for float32 compute (statistics passes and
    compiled merges that widen them in their own loop, ``methods/stored.py``), not rounded to a
    bfloat16 compute dtype. A method given such inputs calls ``widen()`` before torch passes."""
    out_dtype: torch.dtype | None = None
    """The dtype the output stores this piece in, when it takes the method's result as it is:
    a compiled merge may then return the result in that dtype with the report's sums
    (``Merged.sums``). None: the result is in the compute dtype."""

    @property
    def num_experts(self) -> int:
        return len(self.expert_weights)

    def task_vectors(self) -> list[torch.Tensor]:
        """τt = θt − θ0 for every expert, computed once; no tensor returned before is changed.

        The inputs then hold the task vectors in place of the weights (so that a piece holds
        one tensor per expert); ``weights()`` afterwards gives θ0 + τt, which may differ from
        θt in the last bit: call it first when both are needed exactly.
        """
        if self.base is None:
            raise ValueError(f"{self.name}: task vectors need a base model")
        for t, delta in enumerate(self.expert_deltas):
            if delta is None:
                weight = self.expert_weights[t]
                assert weight is not None
                self.expert_deltas[t] = weight - self.base
                self.expert_weights[t] = None
        return [d for d in self.expert_deltas if d is not None]

    def widen(self) -> None:
        """Inputs handed on as stored (``as_stored``) converted to float32, the compute dtype,
        for torch passes; nothing otherwise."""
        if not self.as_stored:
            return

        def wide(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.float() if x is not None and x.dtype == torch.bfloat16 else x

        self.base = wide(self.base)
        self.expert_weights = [wide(x) for x in self.expert_weights]
        self.expert_deltas = [wide(x) for x in self.expert_deltas]
        self.as_stored = False

    def weights(self) -> list[torch.Tensor]:
        """θt for every expert (recomputed as θ0 + τt where only the task vector is held)."""
        for t, weight in enumerate(self.expert_weights):
            if weight is None:
                delta = self.expert_deltas[t]
                assert delta is not None and self.base is not None
                self.expert_weights[t] = self.base + delta
        return [w for w in self.expert_weights if w is not None]

    def rows(self, start: int, stop: int) -> TensorInputs:
        """The same inputs restricted to rows ``start:stop`` (views; generators shared, the
        entry offset moved to ``start``)."""

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
            generators=self.generators,
            offset=self.offset + start * math.prod(self._shape()[1:]),
            expert_ids=self.expert_ids,
            as_stored=self.as_stored,
            out_dtype=self.out_dtype,
        )

    def _shape(self) -> tuple[int, ...]:
        ref = self.base if self.base is not None else self.weights()[0]
        return tuple(ref.shape)

    def generator(self, expert: int) -> torch.Generator:
        """The CPU generator seeded by (recipe seed, expert index, tensor name), continued by
        every row chunk of the tensor."""
        if expert not in self.generators:
            seed = self.mask_key(expert)
            self.generators[expert] = torch.Generator(device="cpu").manual_seed(seed)
        return self.generators[expert]

    def mask_key(self, expert: int) -> int:
        """The key of an expert's random masks: the recipe seed, its index in the recipe and
        the tensor name (``seed_for``)."""
        index = self.expert_ids[expert] if self.expert_ids is not None else expert
        return seed_for(self.seed, index, self.name)

    def philox_mask(self, expert: int, keep: float | torch.Tensor) -> torch.Tensor:
        """A keep-mask (``keep``: a probability, or one per entry) of mergecli's convention:
        Philox4x32-10 keyed by (recipe seed, expert index, tensor name), one uniform per entry
        index from this piece's offset, drawn on the CPU (by several threads for large masks)
        and moved to the inputs' device. Equal for any chunking, thread count or device."""
        from mergecli.methods.philox import keep_mask  # numba, imported on first use

        ref = self.base if self.base is not None else self.weights()[0]
        return keep_mask(self.mask_key(expert), self.offset, tuple(ref.shape), keep).to(ref.device)

    def bernoulli_mask(self, expert: int, keep: float | torch.Tensor) -> torch.Tensor:
        """A keep-mask of ``conventions: mergekit`` (its masks are unchanged): float64 uniforms
        from a CPU torch generator seeded by (recipe seed, expert index, tensor name), on the
        inputs' device."""
        ref = self.base if self.base is not None else self.weights()[0]
        uniform = torch.rand(ref.shape, generator=self.generator(expert), dtype=torch.float64)
        if isinstance(keep, torch.Tensor):
            keep = keep.to("cpu", torch.float64)
        return (uniform < keep).to(ref.device)
