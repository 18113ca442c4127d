"""Counter-based random keep-masks: Philox4x32-10, one uniform per entry from its index alone.

Entry i of a tensor (row-major) takes word i mod 4 of the Philox4x32-10 block at counter
⌊i/4⌋ under a 64-bit key as the uniform u = word · 2⁻³², and is kept when u < p. A mask is
therefore a pure function of (key, entry index, p): identical whatever the row chunks, the
number of threads drawing it or the device it goes to. Large masks are drawn by several
threads, each running the compiled loop (numba, no GIL) on its own range of entries.
Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), define Philox; the
known-answer vectors of their Random123 library check this implementation.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from mergecli.methods.parallel import map_parts

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LOW = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_SCALE = 1.0 / 4294967296.0
PART_ENTRIES = 1 << 18
"""Fewest entries per thread of a mask drawn in parallel."""


@numba.njit(cache=True, nogil=True, inline="always")
def philox4x32(
    c0: np.uint64, c1: np.uint64, c2: np.uint64, c3: np.uint64, k0: np.uint64, k1: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    """The four 32-bit words of Philox4x32-10 at counter (c0..c3) under key (k0, k1), as uint64."""
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _32) ^ c1 ^ k0,
            p1 & _LOW,
            (p0 >> _32) ^ c3 ^ k1,
            p0 & _LOW,
        )
        k0 = (k0 + _W0) & _LOW
        k1 = (k1 + _W1) & _LOW
    return c0, c1, c2, c3


@numba.njit(cache=True, nogil=True)
def _keep(key: np.uint64, offset: int, p: np.ndarray, out: np.ndarray) -> None:
    """out[j] = u(offset + j) < p[j] (or p[0] when p has one entry)."""
    k0, k1 = key & _LOW, key >> _32
    single = p.shape[0] == 1
    n = out.shape[0]
    for b in range(offset >> 2, (offset + n + 3) >> 2):
        block = np.uint64(b)
        words = philox4x32(block & _LOW, block >> _32, np.uint64(0), np.uint64(0), k0, k1)
        for w in range(4):
            j = 4 * b + w - offset
            if 0 <= j < n:
                u = np.float64(words[w]) * _SCALE
                out[j] = u < (p[0] if single else p[j])


@numba.njit(cache=True, nogil=True)
def keep_lanes(key: np.uint64, offset: int, p: float, out: np.ndarray, words: np.ndarray) -> None:
    """``_keep`` with one probability, its Philox blocks side by side (the ten rounds of each
    block in registers, the blocks in vector lanes); ``words``: uint64 scratch of ≥ n + 8."""
    keys = np.empty((2, 10), dtype=np.uint64)
    k0, k1 = key & _LOW, key >> _32
    for r in range(10):
        keys[0, r], keys[1, r] = k0, k1
        k0 = (k0 + _W0) & _LOW
        k1 = (k1 + _W1) & _LOW
    n = out.shape[0]
    first = offset >> 2
    blocks = ((offset + n + 3) >> 2) - first
    for g in range(blocks):
        block = np.uint64(first + g)
        c0, c1, c2, c3 = block & _LOW, block >> _32, np.uint64(0), np.uint64(0)
        for r in range(10):
            p0 = _M0 * c0
            p1 = _M1 * c2
            c0, c1, c2, c3 = (
                (p1 >> _32) ^ c1 ^ keys[0, r],
                p1 & _LOW,
                (p0 >> _32) ^ c3 ^ keys[1, r],
                p0 & _LOW,
            )
        words[4 * g] = c0
        words[4 * g + 1] = c1
        words[4 * g + 2] = c2
        words[4 * g + 3] = c3
    drawn = words[offset & 3 : (offset & 3) + n]
    for j in range(n):
        out[j] = np.float64(drawn[j]) * _SCALE < p


def keep_mask(
    key: int, offset: int, shape: tuple[int, ...], keep: float | torch.Tensor
) -> torch.Tensor:
    """Entries ``offset …`` of a tensor kept with probability ``keep`` (a number or one
    probability per entry), as a CPU bool tensor of ``shape``."""
    n = math.prod(shape)
    if isinstance(keep, torch.Tensor):
        p = keep.to("cpu", torch.float64).contiguous().reshape(-1).numpy()
    else:
        p = np.array([keep], dtype=np.float64)
    out = np.empty(n, dtype=np.bool_)
    parts = min(torch.get_num_threads(), n // PART_ENTRIES)
    if parts < 2:
        _keep(np.uint64(key), offset, p, out)
    else:
        bounds = [n * k // parts for k in range(parts + 1)]

        def part(k: int) -> None:
            a, b = bounds[k], bounds[k + 1]
            _keep(np.uint64(key), offset + a, p if p.size == 1 else p[a:b], out[a:b])

        map_parts(part, parts)
    return torch.from_numpy(out).reshape(shape)


def philox_block(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """One Philox4x32-10 block (for checks against published vectors)."""
    words = philox4x32(*(np.uint64(c) for c in counter), *(np.uint64(k) for k in key))
    return tuple(int(w) for w in words)
