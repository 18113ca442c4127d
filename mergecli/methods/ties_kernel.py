"""TIES' trim, sign election and disjoint merge in one compiled pass (numba, no GIL).

Per entry, the same float32 operations in the same order as the torch passes of
``sparsify.magnitude_trim``, ``elect_sign`` and ``disjoint_merge`` and the final θ0 + λ τm, so
the result is the same bit for bit: the hard shrink, the sum (or sign count) from +0, the
elected ±1, the agreeing entries' sum of τ̂t·wt and Σ wt, the division (0 → 1) times the
non-zero indicator, then ·λ + θ0. Entries that do not agree add +0 to sums that are never −0
(no change). Large tensors are split across the compute threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

PART_ENTRIES = 1 << 18
"""Fewest entries per thread of a tensor merged in parallel."""


BLOCK = 2048
"""Entries per block of the compiled loop (its per-expert loops run over one block)."""


@numba.njit(cache=True, nogil=True)
def _merge(
    tvs: tuple[np.ndarray, ...],
    below: np.ndarray,
    weights: np.ndarray,
    lam: np.float32,
    base: np.ndarray,
    count: bool,
    mean: bool,
    out: np.ndarray,
    kept: np.ndarray,
) -> bool:
    """out = θ0 + λ τm over ``base``'s entries, kept[t] += entries where τ̂t agrees; False (out
    unfinished) when a task-vector entry is not finite."""
    zero, one = np.float32(0.0), np.float32(1.0)
    m, n = len(tvs), base.shape[0]
    trimmed = np.empty((m, BLOCK), dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)
    acc = np.empty(BLOCK, dtype=np.float32)
    norm = np.empty(BLOCK, dtype=np.float32)
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        total[:] = zero
        finite = True
        for t in range(m):
            x, limit, row = tvs[t], below[t], trimmed[t]
            for i in range(size):
                v = x[start + i]
                finite &= v - v == zero
                v = zero if -limit <= v <= limit else v
                row[i] = v
                total[i] += v if not count else (one if v > zero else (-one if v < zero else zero))
        if not finite:
            return False
        for i in range(size):
            total[i] = -one if total[i] < zero else one  # γ: a zero sum is +0, electing +1
        acc[:] = zero
        norm[:] = zero
        for t in range(m):
            w, row, agreeing = weights[t], trimmed[t], 0
            for i in range(size):
                agree = row[i] * total[i] > zero
                agreeing += agree
                norm[i] += w if agree else zero
                acc[i] += row[i] * w if agree else zero
            kept[t] += agreeing
        for i in range(size):
            a = acc[i]
            if mean:
                nonzero = zero if norm[i] == zero else one
                a = a / (norm[i] + (one - nonzero)) * nonzero
            out[start + i] = a * lam + base[start + i]
    return True


def fused_ties(
    tvs: Sequence[torch.Tensor],
    below: Sequence[float],
    weights: Sequence[float],
    lam: float,
    base: torch.Tensor,
    count: bool,
    mean: bool,
) -> tuple[torch.Tensor, list[int]] | None:
    """θ0 + λ · the disjoint merge (``mean`` or sum) of the task vectors hard-shrunk at
    ``below`` around the sign elected by mass (or ``count``), and per expert the number of
    agreeing entries; None when an entry is not finite (the torch passes then decide)."""
    flat = tuple(tv.reshape(-1).numpy() for tv in tvs)
    b = base.reshape(-1).numpy()
    out = np.empty_like(b)
    n, m = b.shape[0], len(flat)
    args = (np.array(below, np.float32), np.array(weights, np.float32), np.float32(lam))
    parts = max(1, min(torch.get_num_threads(), n // PART_ENTRIES))
    bounds = [n * k // parts for k in range(parts + 1)]
    kept = np.zeros((parts, m), dtype=np.int64)

    def run(k: int) -> bool:
        lo, hi = bounds[k], bounds[k + 1]
        part = tuple(x[lo:hi] for x in flat)
        return bool(_merge(part, *args, b[lo:hi], count, mean, out[lo:hi], kept[k]))

    if parts == 1:
        finite = run(0)
    else:
        with ThreadPoolExecutor(parts) as pool:
            finite = all(list(pool.map(run, range(parts))))
    if not finite:
        return None
    return torch.from_numpy(out).reshape(base.shape), [int(c) for c in kept.sum(axis=0)]
