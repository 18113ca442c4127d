"""Streaming sums from which every interference metric follows.

For each tensor the task vectors τt are compared with the model-scope top-k thresholds κt; the
support of expert t is ``Mt = {i : abs(τt,i) ≥ κt and τt,i ≠ 0}`` (the non-zero entries of the
pruned task vector τ̃t). The sums of a set of tensors (one layer, one block, the whole model) add
up, so one streaming pass fills every group at once and memory does not grow with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CHUNK = 1 << 18
"""Entries per chunk: temporaries take 2 bytes per entry and expert plus about 30 per entry."""


def _matrix(experts: int) -> torch.Tensor:
    return torch.zeros(experts, experts, dtype=torch.float64)


@dataclass
class Counts:
    """Sums over a set of entries, for M experts (counts are exact in float64 up to 2^53)."""

    experts: int
    numel: int = 0
    support: torch.Tensor = field(init=False)
    """[M] |Mt|: entries in the top-k of expert t."""
    both: torch.Tensor = field(init=False)
    """[M, M] |Ms ∩ Mt|."""
    conflict: torch.Tensor = field(init=False)
    """[M, M] entries of Ms ∩ Mt where τs and τt have opposite signs."""
    ratio_sum: torch.Tensor = field(init=False)
    """[M, M] Σ over Ms ∩ Mt of max(abs τs, abs τt) / min(abs τs, abs τt) (s ≠ t)."""
    gram: torch.Tensor = field(init=False)
    """[M, M] Σ τs·τt over the full (unpruned) task vectors."""
    trimmed_sq: float = 0.0
    """Σt Σi τ̃t,i²: the numerator of the per-parameter variance (times M)."""
    active: int = 0
    """|∪t Mt|: entries in the top-k of at least one expert."""
    ties_conflict: int = 0
    """Entries of ∪t Mt where some τ̃t are positive and others negative."""
    tall_selfish: int = 0
    """Entries where exactly one TALL mask is on."""
    tall_catastrophic: int = 0
    """Entries where no TALL mask is on."""

    def __post_init__(self) -> None:
        self.support = torch.zeros(self.experts, dtype=torch.float64)
        self.both = _matrix(self.experts)
        self.conflict = _matrix(self.experts)
        self.ratio_sum = _matrix(self.experts)
        self.gram = _matrix(self.experts)

    def add(self, other: Counts) -> None:
        self.numel += other.numel
        self.support += other.support
        self.both += other.both
        self.conflict += other.conflict
        self.ratio_sum += other.ratio_sum
        self.gram += other.gram
        self.trimmed_sq += other.trimmed_sq
        self.active += other.active
        self.ties_conflict += other.ties_conflict
        self.tall_selfish += other.tall_selfish
        self.tall_catastrophic += other.tall_catastrophic


def tensor_counts(tvs: list[torch.Tensor], thresholds: list[float], tall_lambda: float) -> Counts:
    """The sums of one tensor's task vectors (all in one dtype, on one device).

    TALL masks use the full task vectors: ``mt = [abs(τt) > λ·abs(τMTL − τt)]`` with
    ``τMTL = Σt τt`` summed in expert order in the task vectors' dtype.
    """
    experts = len(tvs)
    flats = [tv.reshape(-1) for tv in tvs]
    device = flats[0].device
    both = torch.zeros(experts, experts, dtype=torch.int64, device=device)
    conflict = torch.zeros_like(both)
    ratio_sum = torch.zeros(experts, experts, dtype=torch.float64, device=device)
    gram = torch.zeros_like(ratio_sum)
    scalars = torch.zeros(5, dtype=torch.float64, device=device)
    for start in range(0, flats[0].numel(), CHUNK):
        x = [f[start : start + CHUNK] for f in flats]  # views: no copy of the chunk
        act = [(v.abs() >= k) & (v != 0) for v, k in zip(x, thresholds, strict=True)]
        pos = [a & (v > 0) for a, v in zip(act, x, strict=True)]
        mtl = x[0].clone()
        for s in range(experts):
            xs = x[s].double()  # one expert at a time: float64 temporaries stay small
            gram[s, s] += torch.dot(xs, xs)
            both[s, s] += act[s].sum()
            for t in range(s + 1, experts):
                gram[s, t] += torch.dot(xs, x[t].double())
                shared = act[s] & act[t]
                both[s, t] += shared.sum()
                conflict[s, t] += (shared & (pos[s] ^ pos[t])).sum()  # both non-zero
                a, b = x[s][shared].abs().double(), x[t][shared].abs().double()
                ratio_sum[s, t] += (torch.maximum(a, b) / torch.minimum(a, b)).sum()
            xs.mul_(act[s])
            scalars[0] += torch.dot(xs, xs)
            if s:
                mtl += x[s]
        any_act, any_pos, any_neg = act[0].clone(), pos[0].clone(), act[0] & ~pos[0]
        on = torch.zeros_like(act[0], dtype=torch.int32)
        for a, p, v in zip(act, pos, x, strict=True):
            any_act |= a
            any_pos |= p
            any_neg |= a & ~p
            on += v.abs() > (mtl - v).abs_().mul_(tall_lambda)
        scalars[1] += any_act.sum()
        scalars[2] += (any_pos & any_neg).sum()
        scalars[3] += (on == 1).sum()
        scalars[4] += (on == 0).sum()
    counts = Counts(experts, flats[0].numel())
    upper = [both, conflict, ratio_sum, gram]  # filled on and above the diagonal
    counts.both, counts.conflict, counts.ratio_sum, counts.gram = (
        (m + m.triu(1).T).to("cpu", torch.float64) for m in upper
    )
    counts.support = counts.both.diagonal().clone()
    trimmed_sq, active, ties, selfish, catastrophic = scalars.tolist()
    counts.trimmed_sq = trimmed_sq
    counts.active, counts.ties_conflict = int(active), int(ties)
    counts.tall_selfish, counts.tall_catastrophic = int(selfish), int(catastrophic)
    return counts
