"""Whole-model statistics gathered by streaming passes before the merge.

A method that needs a statistic over the whole task vector (a model-scope top-k threshold, a
rescaler) declares it; the engine streams every tensor through ``observe`` once per pass until
no statistic wants another pass, then hands the values to the method in ``inputs.stats``, where
``inputs.stats[HANDLE]`` is the value of the statistic made with that typed ``Handle``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

if TYPE_CHECKING:
    from mergecli.methods.inputs import TensorInputs

_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}
_DIGIT = 16
BINS = 1 << _DIGIT
"""Bins of one histogram of the magnitude statistics."""


T = TypeVar("T")


class Handle(Generic[T]):
    """Names a whole-model statistic whose value has type T (a module constant of the method
    that declares it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Handle({self.name!r})"


class StatValues:
    """The final values of a run's statistics, looked up by handle."""

    def __init__(self, values: dict[Handle[Any], Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, handle: Handle[T]) -> T:
        return cast(T, self._values[handle])

    @classmethod
    def of(cls, statistics: Sequence[Statistic]) -> StatValues:
        return cls({s.handle: s.value() for s in statistics})


class Statistic(Protocol):
    handle: Handle[Any]

    def passes(self, compute_dtype: torch.dtype) -> int: ...

    def wants_pass(self) -> bool: ...
    def observe(self, inputs: TensorInputs) -> None: ...
    def end_pass(self) -> None: ...
    def value(self) -> Any: ...


@dataclass
class _Target:
    """One wanted rank: the bit prefix found so far and the rank left inside that prefix."""

    prefix: int
    rank: int


class LargestMagnitudes:
    """Exact r-th largest ``abs(τt)`` over all tensors of each expert, for a few ranks r.

    Non-negative IEEE floats order like their bit patterns, so each value is found digit by
    digit (16 bits a pass) from histograms of the bit patterns: two passes for float32, four for
    float64. Memory is at most one 65,536-bin histogram per (expert, rank), whatever the model's
    size. Each value equals ``torch.kthvalue`` on the concatenated task vector, since both see
    the same float bit patterns. On the CPU a tensor's histogram is one compiled loop
    (``histogram.add_digits``), 20 times faster than torch's abs, selection and bincount.
    """

    def __init__(
        self, handle: Handle[Any], ranks: Sequence[Callable[[int], Sequence[int]]]
    ) -> None:
        """``ranks[t]`` maps expert t's number of entries n to 1-based ranks from the top
        (a rank 0 selects nothing: its value is +inf)."""
        self.handle = handle
        self.rank_fns = list(ranks)
        self.counts = [0] * len(self.rank_fns)
        self.targets: list[list[_Target]] | None = None
        self.bits: int | None = None
        self.shift: int | None = None
        self.hist: dict[tuple[int, int | None], torch.Tensor] = {}
        self.done = False

    def passes(self, compute_dtype: torch.dtype) -> int:
        return _BITS[compute_dtype][1] // _DIGIT

    def wants_pass(self) -> bool:
        return not self.done

    def _prefixes(self, t: int) -> set[int | None]:
        """Prefixes histogrammed for expert t this pass (None: the first pass, no prefix)."""
        if self.targets is None:
            return {None}
        return {target.prefix for target in self.targets[t] if target.rank}

    def observe(self, inputs: TensorInputs) -> None:
        for t, tv in enumerate(inputs.task_vectors()):
            int_dtype, bits = _BITS[tv.dtype]
            if self.shift is None:
                self.bits, self.shift = bits, bits - _DIGIT
            if self.targets is None:
                self.counts[t] += tv.numel()
            if tv.device.type == "cpu":
                from mergecli.methods.histogram import add_digits  # numba, on first use

                patterns = tv.contiguous().view(int_dtype).reshape(-1).numpy()
                for prefix in self._prefixes(t):
                    if (t, prefix) not in self.hist:
                        self.hist[t, prefix] = torch.zeros(BINS, dtype=torch.int64)
                    hist = self.hist[t, prefix].numpy()
                    add_digits(patterns, self.shift, -1 if prefix is None else prefix, hist)
                continue
            pattern = tv.abs().view(int_dtype).reshape(-1)
            for prefix in self._prefixes(t):
                # keep only the entries under the prefix found so far
                selected = pattern
                if prefix is not None:
                    selected = pattern[(pattern >> (self.shift + _DIGIT)) == prefix]
                digit = (selected >> self.shift) & (BINS - 1)
                counts = torch.bincount(digit, minlength=BINS).cpu()
                if (t, prefix) in self.hist:
                    self.hist[t, prefix] += counts
                else:
                    self.hist[t, prefix] = counts

    def end_pass(self) -> None:
        assert self.shift is not None
        first = self.targets is None
        if self.targets is None:
            self.targets = [
                [_Target(0, rank) for rank in fn(n)]
                for fn, n in zip(self.rank_fns, self.counts, strict=True)
            ]
        for t, targets in enumerate(self.targets):
            for target in targets:
                if target.rank == 0:
                    continue
                hist = self.hist[t, None if first else target.prefix]
                from_top = torch.cumsum(hist.flip(0), 0)
                index = int(torch.searchsorted(from_top, torch.tensor(target.rank)))
                target.rank -= int(from_top[index - 1]) if index > 0 else 0
                target.prefix = (target.prefix << _DIGIT) | (BINS - 1 - index)
        self.hist = {}
        if self.shift == 0:
            self.done = True
        else:
            self.shift = max(self.shift - _DIGIT, 0)

    def state_bytes(self) -> int:
        """Bytes held by the histograms now (bounded by experts × ranks × 65,536 × 8)."""
        return sum(h.nbytes for h in self.hist.values())

    def value(self) -> list[list[float]]:
        """Per expert, the magnitude at each rank (+inf for a rank 0)."""
        assert self.done and self.targets is not None and self.bits is not None
        int_dtype = torch.int32 if self.bits == 32 else torch.int64
        float_dtype = torch.float32 if self.bits == 32 else torch.float64
        return [
            [
                float(torch.tensor(x.prefix, dtype=int_dtype).view(float_dtype))
                if x.rank
                else float("inf")
                for x in targets
            ]
            for targets in self.targets
        ]


class KthLargestMagnitude(LargestMagnitudes):
    """The TIES threshold: k-th largest ``abs(τt)`` of each expert's whole task vector,
    k = ceil(density · n)."""

    def __init__(self, handle: Handle[list[float]], densities: list[float]) -> None:
        super().__init__(handle, [functools.partial(_top_k, d) for d in densities])
        self.densities = densities

    def value(self) -> list[float]:  # type: ignore[override]
        """Thresholds per expert (+inf where k = 0: nothing is kept)."""
        return [values[0] for values in super().value()]


def _top_k(density: float, n: int) -> list[int]:
    return [kth_rank(density, n)]


def kth_rank(density: float, n: int) -> int:
    """k = ceil(density · n), the number of entries a top-k by magnitude keeps.

    Convention: the product is rounded to 9 decimals first, so that 0.3 · 10 keeps 3, not 4.
    """
    return min(n, max(0, math.ceil(round(density * n, 9))))


def floor_rank(fraction: float, n: int) -> int:
    """floor(fraction · n) clipped to [0, n], the product rounded to 9 decimals first."""
    return min(n, max(0, math.floor(round(fraction * n, 9))))
