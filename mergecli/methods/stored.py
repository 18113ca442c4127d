"""Compiled merges of inputs as stored: the pieces every such kernel shares.

A kernel (``sum_kernel``, ``ties_kernel``) reads bfloat16 or float32 inputs as stored, widens
a block of entries at a time to float32 exactly (bfloat16 bits shifted up by 16), merges it
with the same float32 operations in the same order as the torch passes, rounds the result to
the output dtype (bfloat16 to nearest even, as torch does) and sums the report's figures of
the block (``row_sums``) while it is in cache. One pass over the inputs replaces the
conversions, task vectors, merge, report sums and output conversion of the torch path.

A piece is split into parts of ``PART_ENTRIES`` at fixed boundaries, run on the compute
threads, and the parts' sums are added in part order: the report does not depend on the
number of threads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.parallel import map_parts
from mergecli.methods.result import PieceSums
from mergecli.methods.row_sums import row_sums

BLOCK = 2048
"""Entries per block of a kernel (its scratch rows stay in the first-level cache)."""
PART_ENTRIES = 1 << 18
"""Entries per part of a piece: the unit of work of one compute thread."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
STORED = {torch.bfloat16: np.uint16, torch.float32: np.uint32}
"""Dtypes a kernel reads and writes, and the unsigned integers their bits are seen as."""


@numba.njit(cache=True, nogil=True, inline="always")
def widen(src: np.ndarray, dst: np.ndarray) -> bool:
    """dst[:n] = the float32 bits of the n entries of ``src`` (bfloat16 or float32 bits);
    whether they are all finite.

    The kernels index slices by their loop variable alone (an offset index may be negative
    to numba, whose wraparound check then keeps the loop out of vector lanes)."""
    special = np.uint32(0)
    exponent = np.uint32(0x7F800000)
    if src.itemsize == 2:
        for i in range(src.shape[0]):
            x = np.uint32(src[i]) << np.uint32(16)
            special |= np.uint32((x & exponent) == exponent)
            dst[i] = x
    else:
        for i in range(src.shape[0]):
            x = np.uint32(src[i])
            special |= np.uint32((x & exponent) == exponent)
            dst[i] = x
    return special == 0


@numba.njit(cache=True, nogil=True, inline="always")
def narrow(src: np.ndarray, dst: np.ndarray) -> bool:
    """dst = the first entries of float32 bits ``src`` in dst's dtype: bfloat16 rounded to
    nearest even, or float32 as is; whether every value written is finite (a float32 value
    beyond bfloat16's range rounds to infinity)."""
    special = np.uint32(0)
    if dst.itemsize == 2:
        exponent = np.uint32(0x7F80)
        for i in range(dst.shape[0]):
            x = src[i]
            y = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            special |= np.uint32((y & exponent) == exponent)
            dst[i] = np.uint16(y)
    else:
        exponent = np.uint32(0x7F800000)
        for i in range(dst.shape[0]):
            x = np.uint32(src[i])
            special |= np.uint32((x & exponent) == exponent)
            dst[i] = x
    return special == 0


@numba.njit(cache=True, nogil=True, inline="always")
def block_task_vectors(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    start: int,
    size: int,
    b: np.ndarray,
    tvs: np.ndarray,
) -> bool:
    """b = the ``size`` entries of the base from ``start`` widened to float32, tvs[t] = θt − θ0
    over them; whether every input and task vector is finite (inf − inf would be NaN: checked
    on τ)."""
    zero = np.float32(0.0)
    finite = widen(base[start : start + size], b.view(np.uint32))
    for t in range(len(xs)):
        row = tvs[t]
        finite &= widen(xs[t][start : start + size], row.view(np.uint32))
        special = np.uint32(0)
        for i in range(size):
            tv = row[i] - b[i]
            special |= np.uint32(tv - tv != zero)
            row[i] = tv
        finite &= special == 0
    return finite


@numba.njit(cache=True, nogil=True)
def finish_block(
    result: np.ndarray,
    base: np.ndarray,
    out: np.ndarray,
    tvs: np.ndarray,
    delta: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
) -> bool:
    """Round a block's float32 ``result`` into ``out`` (its slice of the output's bits) and
    add its report sums, δ = result − ``base``: sums = [Σ τt²…, Σ δ², Σ τt·δ…], counts =
    [#τt≠0…, #τt·δ≠0…, #τt·δ>0…] over the block's entries of the rows of ``tvs``. False,
    with nothing added, where a value written is not finite."""
    size = out.shape[0]
    if not narrow(result.view(np.uint32), out):
        return False
    for i in range(size):
        delta[i] = result[i] - base[i]
    m = tvs.shape[0]
    d = delta[:size]
    for t in range(m):
        sq, dot, nonzero, both, same = row_sums(tvs[t, :size], d)
        sums[t] += sq
        sums[m + 1 + t] += dot
        counts[t] += nonzero
        counts[m + t] += both
        counts[2 * m + t] += same
    sums[m] += row_sums(d, d)[0]
    return True


@dataclass
class Stored:
    """A piece's inputs as stored, seen as unsigned integers (``STORED``), and its output."""

    base: np.ndarray | None
    experts: tuple[np.ndarray, ...]
    out: torch.Tensor
    """The result, in the output dtype (or float32), filled by the kernel."""

    @property
    def out_bits(self) -> np.ndarray:
        return bits(self.out)


def bits(x: torch.Tensor) -> np.ndarray:
    """A contiguous float32 or bfloat16 tensor's entries as flat unsigned integers (no copy)."""
    flat = x.reshape(-1)
    if x.dtype == torch.float32:
        return flat.view(torch.int32).numpy().view(np.uint32)
    return flat.view(torch.int16).numpy().view(np.uint16)


def stored(inputs: TensorInputs, with_base: bool) -> Stored | None:
    """The inputs of a kernel when it applies: on the CPU, full expert weights (no adapter's
    task vectors), every input in one dtype (bfloat16 handed on as stored, or float32), the
    result in the output dtype when the engine takes it (``inputs.out_dtype``) and that is
    bfloat16 or float32, else in float32, and rounding to bfloat16 that agrees with torch's
    here. None otherwise (the torch passes run)."""
    experts = [w for w in inputs.expert_weights if w is not None]
    base = inputs.base if with_base else None
    if len(experts) != inputs.num_experts or (with_base and base is None):
        return None
    tensors = [*([base] if base is not None else []), *experts]
    dtypes = {x.dtype for x in tensors}
    out_dtype = inputs.out_dtype if inputs.out_dtype in STORED else torch.float32
    if (
        len(dtypes) != 1
        or tensors[0].dtype not in STORED
        or any(x.device.type != "cpu" or not x.is_contiguous() for x in tensors)
        or (torch.bfloat16 in (out_dtype, tensors[0].dtype) and not narrowing_agrees())
    ):
        return None
    return Stored(
        base=bits(base) if base is not None else None,
        experts=tuple(bits(x) for x in experts),
        out=torch.empty(tensors[0].shape, dtype=out_dtype),
    )


def run_parts(
    n: int, m: int, part: Callable[[int, int, int, np.ndarray, np.ndarray], bool]
) -> PieceSums | None:
    """Run ``part(k, lo, hi, sums, counts)`` over the fixed parts of ``n`` entries (on the compute
    threads when there are several) and add their report sums in part order; None when a part
    returns False (a value is not finite: the caller runs the torch passes)."""
    parts = part_count(n)
    sums = np.zeros((parts, 2 * m + 1), dtype=np.float64)
    counts = np.zeros((parts, 3 * m), dtype=np.int64)

    def run(k: int) -> bool:
        lo, hi = k * PART_ENTRIES, min(n, (k + 1) * PART_ENTRIES)
        return part(k, lo, hi, sums[k], counts[k])

    if not all(map_parts(run, parts)):
        return None
    total = [0.0] * (2 * m + 1)
    for k in range(parts):  # in part order, whatever thread ran each
        total = [a + float(b) for a, b in zip(total, sums[k], strict=True)]
    counted = [int(c) for c in counts.sum(axis=0)]
    return PieceSums(
        tv_sq=total[:m],
        delta_sq=total[m],
        dot=total[m + 1 :],
        nonzero=counted[:m],
        both=counted[m : 2 * m],
        same=counted[2 * m :],
    )


def float32_numbers(numbers: Sequence[float]) -> bool:
    """Whether every parameter is a finite float32 (the kernels compute with them as such;
    torch's passes decide about the others)."""
    return all(math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in numbers)


def part_count(n: int) -> int:
    """The parts of a piece of ``n`` entries."""
    return max(1, math.ceil(n / PART_ENTRIES))


@functools.cache
def narrowing_agrees() -> bool:
    """Whether ``narrow`` rounds float32 to bfloat16 as torch does on this CPU (its vector
    path may use the CPU's own instruction): 2¹⁶ random bit patterns of finite floats, with
    subnormals, exact halfway cases and overflow to infinity."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 2**31, (1 << 16,), generator=g, dtype=torch.int64)
    raw[:4096] &= 0x007FFFFF  # subnormals and zeros
    raw[4096:8192] = (raw[4096:8192] & ~0xFFFF) | 0x8000  # halfway between two bfloat16
    raw[8192:8200] = 0x7F7FFFFF  # the largest float32: rounds to infinity
    sign = torch.randint(0, 2, raw.shape, generator=g, dtype=torch.int64) << 31
    x = (raw | sign).to(torch.int64)
    x = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)].contiguous()
    want = x.to(torch.bfloat16)
    got = torch.empty_like(want)
    narrow(bits(x), bits(got))
    return torch.equal(got.view(torch.int16), want.view(torch.int16))
