"""Whole-model statistics gathered by streaming passes before the merge.

A method that needs a statistic over the whole task vector (a model-scope top-k threshold, a
rescaler) declares it; the engine streams every tensor through ``observe`` once per pass until
no statistic wants another pass, then hands the values to the method in ``inputs.stats``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from mergecli.methods.inputs import TensorInputs

_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}
_DIGIT = 16


class Statistic(Protocol):
    key: str

    def passes(self, compute_dtype: torch.dtype) -> int: ...

    def wants_pass(self) -> bool: ...
    def observe(self, inputs: TensorInputs) -> None: ...
    def end_pass(self) -> None: ...
    def value(self) -> Any: ...


class KthLargestMagnitude:
    """Exact k-th largest ``abs(τt)`` over all tensors of each expert, k = ceil(density · n).

    Non-negative IEEE floats order like their bit patterns, so the threshold is found digit by
    digit (16 bits a pass) from histograms of the bit patterns: two passes for float32, four for
    float64. Memory is one 65,536-bin histogram per expert. The result equals ``torch.kthvalue``
    on the concatenated task vector, since both see the same float bit patterns.
    """

    def __init__(self, key: str, densities: list[float]) -> None:
        self.key = key
        self.densities = densities
        self.counts = [0] * len(densities)
        self.prefix = [0] * len(densities)
        self.rank = [0] * len(densities)
        self.bits: int | None = None
        self.shift: int | None = None
        self.hist: list[torch.Tensor] | None = None
        self.done = False

    def passes(self, compute_dtype: torch.dtype) -> int:
        return _BITS[compute_dtype][1] // _DIGIT

    def wants_pass(self) -> bool:
        return not self.done

    def observe(self, inputs: TensorInputs) -> None:
        for t, tv in enumerate(inputs.task_vectors()):
            int_dtype, bits = _BITS[tv.dtype]
            if self.shift is None:
                self.bits, self.shift = bits, bits - _DIGIT
            if self.hist is None:
                self.hist = [torch.zeros(1 << _DIGIT, dtype=torch.int64) for _ in self.densities]
            pattern = tv.abs().view(int_dtype).reshape(-1)
            if self.shift + _DIGIT < bits:  # keep only entries under the prefix found so far
                pattern = pattern[(pattern >> (self.shift + _DIGIT)) == self.prefix[t]]
            digit = (pattern >> self.shift) & ((1 << _DIGIT) - 1)
            self.hist[t] += torch.bincount(digit, minlength=1 << _DIGIT).cpu()
            if self.shift + _DIGIT == bits:
                self.counts[t] += tv.numel()

    def end_pass(self) -> None:
        assert self.hist is not None and self.shift is not None and self.bits is not None
        first = self.shift + _DIGIT == self.bits
        for t, hist in enumerate(self.hist):
            if first:
                k = kth_rank(self.densities[t], self.counts[t])
                self.rank[t] = k  # 1-based rank from the top among entries under the prefix
            if self.rank[t] == 0:
                continue
            from_top = torch.cumsum(hist.flip(0), 0)
            index = int(torch.searchsorted(from_top, torch.tensor(self.rank[t])))
            above = int(from_top[index - 1]) if index > 0 else 0
            self.rank[t] -= above
            self.prefix[t] = (self.prefix[t] << _DIGIT) | ((1 << _DIGIT) - 1 - index)
        self.hist = None
        if self.shift == 0:
            self.done = True
        else:
            self.shift = max(self.shift - _DIGIT, 0)

    def value(self) -> list[float]:
        """Thresholds per expert (+inf where k = 0: nothing is kept)."""
        assert self.done and self.bits is not None
        int_dtype = torch.int32 if self.bits == 32 else torch.int64
        float_dtype = torch.float32 if self.bits == 32 else torch.float64
        return [
            float(torch.tensor(p, dtype=int_dtype).view(float_dtype)) if r else float("inf")
            for p, r in zip(self.prefix, self.rank, strict=True)
        ]


def kth_rank(density: float, n: int) -> int:
    """k = ceil(density · n), the number of entries a top-k by magnitude keeps.

    Convention: the product is rounded to 9 decimals first, so that 0.3 · 10 keeps 3, not 4.
    """
    return min(n, max(0, math.ceil(round(density * n, 9))))
