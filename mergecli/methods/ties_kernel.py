"""TIES' trim, sign election and disjoint merge in one compiled pass (numba, no GIL).

Per entry, the same float32 operations in the same order as the torch passes of
``sparsify.magnitude_trim``, ``elect_sign`` and ``disjoint_merge`` and the final θ0 + λ τm, so
the result is the same bit for bit: the hard shrink, the sum (or sign count) from +0, the
elected ±1, the agreeing entries' sum of τ̂t·wt and Σ wt, the division (0 → 1) times the
non-zero indicator, then ·λ + θ0. Entries that do not agree add +0 to sums that are never −0
(no change). Large tensors are split across the compute threads.

``fused_ties`` takes float32 task vectors; ``stored_ties`` takes a piece's inputs as stored
(``methods/stored.py``): it forms τt = θt − θ0 a block at a time, applies DARE's Philox mask
and rescale (τt·m ÷ density, as ``sparsify.dare_drop``) where asked, and returns the result in
the output dtype with the report's sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.parallel import map_parts
from mergecli.methods.philox import keep_lanes
from mergecli.methods.result import Merged
from mergecli.methods.stored import (
    BLOCK,
    block_task_vectors,
    finish_block,
    float32_numbers,
    part_count,
    run_parts,
    stored,
)

PART_ENTRIES = 1 << 18
"""Fewest entries per thread of a tensor merged in parallel."""


@numba.njit(cache=True, nogil=True, inline="always")
def _shrink_and_elect(
    trimmed: np.ndarray, size: int, below: np.ndarray, count: bool, total: np.ndarray
) -> None:
    """Hard-shrink each row of ``trimmed`` at ``below`` in place and set total = the elected
    ±1 per entry (Σ τ̂t, or Σ sign τ̂t with ``count``, from +0; a zero sum elects +1)."""
    zero, one = np.float32(0.0), np.float32(1.0)
    m = trimmed.shape[0]
    tot = total[:size]
    tot[:] = zero
    for t in range(m):
        row, limit = trimmed[t, :size], below[t]
        for i in range(size):
            v = row[i]
            v = zero if -limit <= v <= limit else v
            row[i] = v
            tot[i] += v if not count else (one if v > zero else (-one if v < zero else zero))
    for i in range(size):
        tot[i] = -one if tot[i] < zero else one  # γ: a zero sum is +0, electing +1


@numba.njit(cache=True, nogil=True, inline="always")
def _disjoint(
    trimmed: np.ndarray,
    size: int,
    gamma: np.ndarray,
    weights: np.ndarray,
    lam: np.float32,
    mean: bool,
    b: np.ndarray,
    acc: np.ndarray,
    norm: np.ndarray,
    kept: np.ndarray,
) -> None:
    """acc = θ0 + λ · the disjoint merge of the rows of ``trimmed`` around ``gamma``; kept[t] +=
    the entries where τ̂t agrees."""
    zero, one = np.float32(0.0), np.float32(1.0)
    a, nm, g, base = acc[:size], norm[:size], gamma[:size], b[:size]
    a[:] = zero
    nm[:] = zero
    for t in range(trimmed.shape[0]):
        w, row, agreeing = weights[t], trimmed[t, :size], 0
        for i in range(size):
            agree = row[i] * g[i] > zero
            agreeing += agree
            nm[i] += w if agree else zero
            a[i] += row[i] * w if agree else zero
        kept[t] += agreeing
    for i in range(size):
        x = a[i]
        if mean:
            nonzero = zero if nm[i] == zero else one
            x = x / (nm[i] + (one - nonzero)) * nonzero
        a[i] = x * lam + base[i]


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
    zero = np.float32(0.0)
    m, n = len(tvs), base.shape[0]
    trimmed = np.empty((m, BLOCK), dtype=np.float32)
    gamma = np.empty(BLOCK, dtype=np.float32)
    acc = np.empty(BLOCK, dtype=np.float32)
    norm = np.empty(BLOCK, dtype=np.float32)
    b = np.empty(BLOCK, dtype=np.float32)
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        special = np.uint32(0)
        for t in range(m):
            x, row = tvs[t][start : start + size], trimmed[t]
            for i in range(size):
                v = x[i]
                special |= np.uint32(v - v != zero)
                row[i] = v
        if special:
            return False
        b[:size] = base[start : start + size]
        _shrink_and_elect(trimmed, size, below, count, gamma)
        _disjoint(trimmed, size, gamma, weights, lam, mean, b, acc, norm, kept)
        out[start : start + size] = acc[:size]
    return True


@numba.njit(cache=True, nogil=True)
def _merge_stored(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    keys: np.ndarray,
    keep: np.ndarray,
    dare: bool,
    rescale: bool,
    below: np.ndarray,
    weights: np.ndarray,
    lam: np.float32,
    count: bool,
    mean: bool,
    offset: int,
    out: np.ndarray,
    lo: int,
    hi: int,
    kept: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
) -> bool:
    """out[lo:hi] = θ0 + λ τm of inputs as stored (τt = θt − θ0, DARE-dropped when ``dare``:
    τt·m ÷ keep[t] with ``rescale``, m the Philox mask of key keys[t] at entry offset + j),
    kept[t] += agreeing entries, and the report's sums; False when an input, a task vector or
    a result (in out's dtype) is not finite."""
    m = len(xs)
    tvs = np.empty((m, BLOCK), dtype=np.float32)
    trimmed = np.empty((m, BLOCK), dtype=np.float32)
    gamma = np.empty(BLOCK, dtype=np.float32)
    acc = np.empty(BLOCK, dtype=np.float32)
    norm = np.empty(BLOCK, dtype=np.float32)
    b = np.empty(BLOCK, dtype=np.float32)
    delta = np.empty(BLOCK, dtype=np.float32)
    mask = np.empty(BLOCK, dtype=np.bool_)
    words = np.empty(BLOCK + 8, dtype=np.uint64)
    for start in range(lo, hi, BLOCK):
        size = min(BLOCK, hi - start)
        if not block_task_vectors(xs, base, start, size, b, tvs):
            return False
        for t in range(m):
            row, dropped = tvs[t], trimmed[t]
            if not dare:
                dropped[:size] = row[:size]
            else:
                keep_lanes(keys[t], offset + start, keep[t], mask[:size], words)
                density = np.float32(keep[t])
                for i in range(size):
                    v = row[i] * np.float32(mask[i])
                    dropped[i] = v / density if rescale else v
        _shrink_and_elect(trimmed, size, below, count, gamma)
        _disjoint(trimmed, size, gamma, weights, lam, mean, b, acc, norm, kept)
        block = out[start : start + size]
        if not finish_block(acc, b, block, tvs, delta, sums, counts):
            return False
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

    if not all(map_parts(run, parts)):
        return None
    return torch.from_numpy(out).reshape(base.shape), [int(c) for c in kept.sum(axis=0)]


def stored_ties(
    inputs: TensorInputs,
    below: Sequence[float],
    weights: Sequence[float],
    lam: float,
    count: bool,
    mean: bool,
    dare: tuple[Sequence[float], bool] | None = None,
) -> Merged | None:
    """``fused_ties`` of the inputs as stored (``methods/stored.py``), the task vectors first
    DARE-dropped when ``dare`` = (densities, rescale) is given; the result in the output
    dtype with the agreeing fractions and the report's sums, or None where the kernel does not
    apply or a value is not finite."""
    piece = stored(inputs, with_base=True) if float32_numbers([*weights, lam]) else None
    if piece is None or piece.base is None:
        return None
    xs, base, out = piece.experts, piece.base, piece.out_bits
    m, n = len(xs), out.shape[0]
    keep, rescale = dare if dare is not None else ([1.0] * m, False)
    keys = np.array(
        [inputs.mask_key(t) for t in range(m)] if dare is not None else [0] * m, np.uint64
    )
    args = (
        keys,
        np.array(keep, np.float64),
        dare is not None,
        rescale,
        np.array(below, np.float32),
        np.array(weights, np.float32),
        np.float32(lam),
        count,
        mean,
        inputs.offset,
    )
    kept = np.zeros((part_count(n), m), dtype=np.int64)

    def part(k: int, lo: int, hi: int, sums: np.ndarray, counts: np.ndarray) -> bool:
        return bool(_merge_stored(xs, base, *args, out, lo, hi, kept[k], sums, counts))

    sums = run_parts(n, m, part)
    if sums is None:
        return None
    fractions = [int(c) / max(n, 1) for c in kept.sum(axis=0)]
    return Merged(piece.out, list(fractions), sums, checked=True)
