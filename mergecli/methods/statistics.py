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


def _bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """The integer view and width of ``dtype``'s bit patterns; half precision (mergekit's
    conventions) is counted as its exact float32 widening."""
    return _BITS.get(dtype, _BITS[torch.float32])


_DIGIT = 16
BINS = 1 << _DIGIT
"""Bins of one histogram of the magnitude statistics."""
LANE_ENTRIES = 1 << 17
"""Fewest entries per lane of a histogram pass: a piece's entries are counted by several
compute threads, each into its own row of the histogram (``add_histogram``)."""


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

    def get(self, handle: Handle[T]) -> T | None:
        """The value, or None where the run gathered no such statistic."""
        return cast(T | None, self._values.get(handle))

    @classmethod
    def of(cls, statistics: Sequence[Statistic]) -> StatValues:
        return cls({s.handle: s.value() for s in statistics})


class Statistic(Protocol):
    handle: Handle[Any]
    tensors: set[str] | None
    """The merged tensors it observes (None: all of them). A statistic that names its tensors
    is one of each tensor alone: the engine keeps those streamed in row pieces, since a method
    takes a whole tensor's statistic from the tensor itself."""

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


def task_vector_terms(inputs: TensorInputs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per expert, (θt, θ0) where the inputs hold weights on the CPU in float32 or bfloat16
    (as stored: the histogram loop widens them and forms the float32 τt as it reads), else
    (τt, None) in the compute dtype."""
    base, weights = inputs.base, inputs.expert_weights
    widened = (torch.float32, torch.bfloat16) if inputs.as_stored else (torch.float32,)
    if (
        base is not None
        and base.device.type == "cpu"
        and base.dtype in widened
        and all(w is not None and w.dtype == base.dtype for w in weights)
    ):
        return [(w, base) for w in weights if w is not None]
    stored = [x for x in [base, *weights, *inputs.expert_deltas] if x is not None]
    if not inputs.as_stored or base is None or all(x.dtype != torch.bfloat16 for x in stored):
        return [(tv, None) for tv in inputs.task_vectors()]
    return [  # inputs handed on as stored: the float32 τt that the merge pass forms
        (d.float() if d is not None else cast(torch.Tensor, w).float() - base.float(), None)
        for w, d in zip(weights, inputs.expert_deltas, strict=True)
    ]


def add_histogram(
    hist: torch.Tensor | None,
    tv: torch.Tensor,
    shift: int,
    prefix: int | None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hist`` (a new one for None) plus the histogram of the 16-bit digit at ``shift`` of the
    bit patterns of ``abs(tv)`` (``abs(tv − base)`` when ``base`` is given)
    whose higher bits equal ``prefix`` (None: every entry); a bfloat16 ``tv`` and ``base``
    are widened to float32 first. On the CPU one compiled loop (``histogram.add_digits``), 20
    times faster than torch's abs, selection and bincount, run by the compute threads on parts
    of the piece, each counting into its own row of ``hist`` (``lanes`` sums the rows)."""
    if base is None and tv.dtype not in _BITS:  # half precision: its exact float32 widening
        tv = tv.float()
    if tv.device.type == "cpu":
        from mergecli.methods import histogram  # numba, on first use
        from mergecli.methods.parallel import map_parts

        if hist is None:
            hist = torch.zeros((torch.get_num_threads(), BINS), dtype=torch.int64)
        digit = -1 if prefix is None else prefix
        if base is not None and tv.dtype == torch.bfloat16:
            arrays = [x.contiguous().view(torch.uint16).reshape(-1).numpy() for x in (tv, base)]
            count: Callable[..., None] = histogram.add_bfloat16_difference_digits
        elif base is not None:
            arrays = [x.contiguous().reshape(-1).numpy() for x in (tv, base)]
            count = histogram.add_difference_digits
        else:
            arrays = [tv.contiguous().view(_BITS[tv.dtype][0]).reshape(-1).numpy()]
            count = histogram.add_digits
        n = arrays[0].shape[0]
        parts = max(1, min(hist.shape[0], n // LANE_ENTRIES))
        bounds = [n * k // parts for k in range(parts + 1)]
        rows = hist.numpy()

        def part(k: int) -> None:
            lo, hi = bounds[k], bounds[k + 1]
            count(*(a[lo:hi] for a in arrays), shift, digit, rows[k])

        map_parts(part, parts)
        return hist
    int_dtype = _BITS[tv.dtype][0]
    pattern = tv.abs().view(int_dtype).reshape(-1)
    if prefix is not None:  # keep only the entries under the prefix found so far
        pattern = pattern[(pattern >> (shift + _DIGIT)) == prefix]
    counts = torch.bincount((pattern >> shift) & (BINS - 1), minlength=BINS).cpu()
    return counts if hist is None else hist.add_(counts)


def lanes_total(hist: torch.Tensor) -> torch.Tensor:
    """One histogram: the sum of its lanes' rows (the CPU's), or itself."""
    return hist.sum(0) if hist.dim() == 2 else hist


def narrow(target: _Target, hist: torch.Tensor) -> None:
    """Extend ``target``'s prefix by the digit its rank falls on in ``hist`` (that digit's
    histogram under the prefix; rows of lanes are summed) and make its rank relative to that
    digit."""
    from_top = torch.cumsum(lanes_total(hist).flip(0), 0)
    index = int(torch.searchsorted(from_top, torch.tensor(target.rank)))
    target.rank -= int(from_top[index - 1]) if index > 0 else 0
    target.prefix = (target.prefix << _DIGIT) | (BINS - 1 - index)


def magnitude(target: _Target, bits: int) -> float:
    """The float whose bit pattern a finished target holds (+inf for a rank 0)."""
    if not target.rank:
        return float("inf")
    int_dtype, float_dtype = (
        (torch.int32, torch.float32) if bits == 32 else (torch.int64, torch.float64)
    )
    return float(torch.tensor(target.prefix, dtype=int_dtype).view(float_dtype))


class LargestMagnitudes:
    """Exact r-th largest ``abs(τt)`` over all tensors of each expert, for a few ranks r.

    Non-negative IEEE floats order like their bit patterns, so each value is found digit by
    digit (16 bits a pass) from histograms of the bit patterns: two passes for float32, four for
    float64. Memory is at most one 65,536-bin histogram per (expert, rank) and compute thread,
    whatever the model's size. Each value equals ``torch.kthvalue`` on the concatenated task
    vector, since both see the same float bit patterns.
    """

    def __init__(
        self, handle: Handle[Any], ranks: Sequence[Callable[[int], Sequence[int]]]
    ) -> None:
        """``ranks[t]`` maps expert t's number of entries n to 1-based ranks from the top
        (a rank 0 selects nothing: its value is +inf)."""
        self.handle = handle
        self.tensors: set[str] | None = None
        self.takes_bfloat16 = True
        self.rank_fns = list(ranks)
        self.counts = [0] * len(self.rank_fns)
        self.targets: list[list[_Target]] | None = None
        self.bits: int | None = None
        self.shift: int | None = None
        self.hist: dict[tuple[int, int | None], torch.Tensor] = {}
        self.done = False

    def passes(self, compute_dtype: torch.dtype) -> int:
        return _bits(compute_dtype)[1] // _DIGIT

    def wants_pass(self) -> bool:
        return not self.done

    def _prefixes(self, t: int) -> set[int | None]:
        """Prefixes histogrammed for expert t this pass (None: the first pass, no prefix)."""
        if self.targets is None:
            return {None}
        return {target.prefix for target in self.targets[t] if target.rank}

    def observe(self, inputs: TensorInputs) -> None:
        for t, (tv, base) in enumerate(task_vector_terms(inputs)):
            if self.shift is None:
                self.bits = _bits(tv.dtype)[1]  # bfloat16 as stored: float32's
                self.shift = self.bits - _DIGIT
            if self.targets is None:
                self.counts[t] += tv.numel()
            for prefix in self._prefixes(t):
                self.hist[t, prefix] = add_histogram(
                    self.hist.get((t, prefix)), tv, self.shift, prefix, base
                )

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
                if target.rank:
                    narrow(target, self.hist[t, None if first else target.prefix])
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
        return [[magnitude(x, self.bits) for x in targets] for targets in self.targets]


class KthLargestMagnitude(LargestMagnitudes):
    """The TIES threshold: k-th largest ``abs(τt)`` of each expert's whole task vector,
    k = ceil(density · n)."""

    def __init__(self, handle: Handle[list[float]], densities: list[float]) -> None:
        super().__init__(handle, [functools.partial(_top_k, d) for d in densities])
        self.densities = densities

    def value(self) -> list[float]:  # type: ignore[override]
        """Thresholds per expert (+inf where k = 0: nothing is kept)."""
        return [values[0] for values in super().value()]


class TensorKthLargestMagnitude:
    """Per tensor, TIES' tensor-scope threshold: the k-th largest ``abs(τt)`` of each expert's
    task vector within that tensor alone, k = ceil(density · n).

    The same digit-by-digit selection as ``LargestMagnitudes`` (one 16-bit digit a pass), with
    a tensor's histograms summed over its pieces as they stream by (the pieces of one tensor
    come together) and narrowed when the next tensor starts, so a tensor merged in row chunks
    is never held whole. Memory: one histogram per expert (a row per compute thread) for the
    tensor observed, and a prefix and a rank per (tensor, expert) between passes. Each value
    equals ``kth_largest`` on the whole tensor.
    """

    def __init__(self, handle: Handle[dict[str, list[float]]], densities: dict[str, list[float]]):
        """``densities``: per tensor, each expert's density."""
        self.handle = handle
        self.densities = densities
        self.tensors: set[str] | None = set(densities)
        self.takes_bfloat16 = True
        self.targets: dict[str, list[_Target]] = {}
        self.first = True
        self.bits: int | None = None
        self.shift: int | None = None
        self.current: str | None = None
        self.count = 0
        self.hist: list[torch.Tensor | None] = []
        self.done = False

    def passes(self, compute_dtype: torch.dtype) -> int:
        return _bits(compute_dtype)[1] // _DIGIT

    def wants_pass(self) -> bool:
        return not self.done

    def observe(self, inputs: TensorInputs) -> None:
        if self.tensors is not None and inputs.name not in self.tensors:
            return
        if inputs.name != self.current:
            self._narrow()
            self.current, self.count = inputs.name, 0
            self.hist = [None] * inputs.num_experts
        for t, (tv, base) in enumerate(task_vector_terms(inputs)):
            if self.shift is None:
                self.bits = _bits(tv.dtype)[1]  # bfloat16 as stored: float32's
                self.shift = self.bits - _DIGIT
            self.count += tv.numel() if t == 0 else 0
            target = None if self.first else self.targets[inputs.name][t]
            if target is None or target.rank:
                prefix = None if target is None else target.prefix
                self.hist[t] = add_histogram(self.hist[t], tv, self.shift, prefix, base)

    def _narrow(self) -> None:
        """The tensor observed last is complete: narrow its targets by its histograms."""
        if self.current is None:
            return
        if self.first:
            densities = self.densities[self.current]
            self.targets[self.current] = [_Target(0, kth_rank(d, self.count)) for d in densities]
        for target, hist in zip(self.targets[self.current], self.hist, strict=True):
            if target.rank:
                assert hist is not None
                narrow(target, hist)
        self.current, self.hist = None, []

    def end_pass(self) -> None:
        self._narrow()
        self.first = False
        if not self.shift:  # the last digit (or nothing observed)
            self.done = True
        else:
            self.shift = max(self.shift - _DIGIT, 0)

    def state_bytes(self) -> int:
        """Bytes held by the histograms now (one tensor's: experts × 65,536 × 8)."""
        return sum(h.nbytes for h in self.hist if h is not None)

    def value(self) -> dict[str, list[float]]:
        """Per tensor, the threshold of each expert (+inf where k = 0: nothing is kept)."""
        assert self.done
        bits = self.bits or 32
        return {n: [magnitude(x, bits) for x in ts] for n, ts in self.targets.items()}


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
