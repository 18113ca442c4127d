"""One compiled pass (numba) adding a task vector's magnitude digits to a histogram.

The float bit pattern of abs(x) is shifted right by ``shift`` and its low 16 bits counted,
among the entries whose bits above those 16 equal ``prefix`` (all entries for a prefix of
-1): the digit histograms of ``statistics.LargestMagnitudes``, without the abs copy, the
boolean selection and the index tensor that the torch expressions make.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def add_digits(bits: np.ndarray, shift: int, prefix: int, hist: np.ndarray) -> None:
    """hist[(b >> shift) & 0xFFFF] += 1 for each b = bits of abs(x) with b >> (shift + 16) ==
    prefix (``bits``: the values' bit patterns as signed integers of their width)."""
    sign_off = (1 << (bits.itemsize * 8 - 1)) - 1
    for b in bits:
        m = b & sign_off
        if prefix < 0 or (m >> (shift + 16)) == prefix:
            hist[(m >> shift) & 0xFFFF] += 1


def kth_largest_magnitude(bits: np.ndarray, rank: int) -> int:
    """Bit pattern of the ``rank``-th largest abs(x) (1-based, rank ≥ 1) of one array of bit
    patterns, digit by digit: one histogram pass per 16 bits."""
    prefix = -1
    for shift in range(bits.itemsize * 8 - 16, -1, -16):
        hist = np.zeros(1 << 16, dtype=np.int64)
        add_digits(bits, shift, prefix, hist)
        from_top = np.cumsum(hist[::-1])
        index = int(np.searchsorted(from_top, rank))  # the first digit reaching the rank
        rank -= int(from_top[index - 1]) if index > 0 else 0
        prefix = (max(prefix, 0) << 16) | ((1 << 16) - 1 - index)
    return prefix


BLOCK = 4096
"""Entries of a float32 task vector formed at a time by the difference loops."""


@numba.njit(cache=True, nogil=True)
def add_difference_digits(
    weight: np.ndarray, base: np.ndarray, shift: int, prefix: int, hist: np.ndarray
) -> None:
    """``add_digits`` over the float32 task vector weight − base, formed a block at a time
    (the same float32 subtraction as torch's, without storing the task vector)."""
    block = np.empty(BLOCK, dtype=np.float32)
    bits = block.view(np.int32)
    for start in range(0, weight.shape[0], BLOCK):
        size = min(BLOCK, weight.shape[0] - start)
        w, b = weight[start : start + size], base[start : start + size]
        for i in range(size):  # slices indexed by the loop variable: vector lanes
            block[i] = w[i] - b[i]
        add_digits(bits[:size], shift, prefix, hist)


@numba.njit(cache=True, nogil=True)
def add_bfloat16_difference_digits(
    weight: np.ndarray, base: np.ndarray, shift: int, prefix: int, hist: np.ndarray
) -> None:
    """``add_difference_digits`` of bfloat16 inputs (their bit patterns as uint16): each is
    widened to float32 exactly (its bits shifted up by 16) before the float32 subtraction."""
    wide = np.empty(BLOCK, dtype=np.uint32)
    low = np.empty(BLOCK, dtype=np.uint32)
    x, y = wide.view(np.float32), low.view(np.float32)
    block = np.empty(BLOCK, dtype=np.float32)
    bits = block.view(np.int32)
    for start in range(0, weight.shape[0], BLOCK):
        size = min(BLOCK, weight.shape[0] - start)
        w, b = weight[start : start + size], base[start : start + size]
        for i in range(size):  # slices indexed by the loop variable: vector lanes
            wide[i] = np.uint32(w[i]) << np.uint32(16)
            low[i] = np.uint32(b[i]) << np.uint32(16)
        for i in range(size):
            block[i] = x[i] - y[i]
        add_digits(bits[:size], shift, prefix, hist)
