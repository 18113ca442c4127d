"""The weighted sum of ``task_arithmetic`` in one compiled pass (numba, no GIL).

torch's ``out.add_(x, alpha=w)`` is a fused multiply-add (rounded once) on CPUs that have one;
the loop uses LLVM's fma the same way, the rest are plain float32 operations in torch's order:
τt = θt − θ0, Σ from +0, ÷ Σ w, ·λ, + θ0. Whether that matches torch on this CPU is checked
once, on a sample, before the loop is used (``agrees_with_torch``); otherwise the torch passes
run. Inputs are read as stored and the report's sums taken on the way (``methods/stored.py``).

``linear`` keeps torch's passes: without a base it has no report sums, so it would load numba
only for this loop, and numba's start-up (0.3–0.5 s a process) costs more than the loop saves
on models of a few hundred megabytes (``docs/performance.md``).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.result import Merged
from mergecli.methods.stored import (
    BLOCK,
    Stored,
    block_task_vectors,
    finish_block,
    float32_numbers,
    run_parts,
    stored,
)


@intrinsic
def _fma(typingctx: Any, x: Any, w: Any, acc: Any) -> Any:
    """x·w + acc rounded once (LLVM's fma intrinsic), for float32 operands."""
    sig = types.float32(types.float32, types.float32, types.float32)
    return sig, lambda context, builder, signature, args: builder.fma(*args)


@numba.njit(cache=True, nogil=True)
def _sum(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    coefficients: np.ndarray,
    divide: bool,
    total: np.float32,
    lam: np.float32,
    out: np.ndarray,
    lo: int,
    hi: int,
    sums: np.ndarray,
    counts: np.ndarray,
) -> bool:
    """out[lo:hi] = θ0 + λ Σ wt (θt − θ0) (the sum ÷ ``total`` when ``divide``) and the report's
    sums of τt and δ; False (out unfinished) when an input, a task vector or a result (in out's
    dtype) is not finite."""
    m = len(xs)
    zero = np.float32(0.0)
    tvs = np.empty((m, BLOCK), dtype=np.float32)
    b = np.empty(BLOCK, dtype=np.float32)
    result = np.empty(BLOCK, dtype=np.float32)
    delta = np.empty(BLOCK, dtype=np.float32)
    for start in range(lo, hi, BLOCK):
        size = min(BLOCK, hi - start)
        if not block_task_vectors(xs, base, start, size, b, tvs):
            return False
        result[:size] = zero
        for t in range(m):  # entry by entry in the inner loops: vector lanes
            row, c = tvs[t], coefficients[t]
            for i in range(size):
                result[i] = _fma(row[i], c, result[i])  # type: ignore[call-arg]
        if divide:
            for i in range(size):
                result[i] = result[i] / total
        for i in range(size):
            result[i] = result[i] * lam + b[i]
        block = out[start : start + size]
        if not finish_block(result, b, block, tvs, delta, sums, counts):
            return False
    return True


def task_arithmetic_sum(
    inputs: TensorInputs, weights: list[float], total: float | None, lam: float
) -> Merged | None:
    """θ0 + λ Σ wt τt (the sum ÷ ``total`` unless None) by the compiled loop, with the report's
    sums; None where the loop does not apply or a value is not finite (the caller widens the
    inputs and runs torch's passes)."""
    numbers = [*weights, lam, *([total] if total is not None else [])]
    piece = stored(inputs, with_base=True) if float32_numbers(numbers) else None
    if piece is None or not agrees_with_torch():
        return None
    return _run(piece, weights, total, lam)


def _run(piece: Stored, weights: list[float], total: float | None, lam: float) -> Merged | None:
    """``task_arithmetic_sum`` over inputs a kernel takes."""
    xs, base, out = piece.experts, piece.base, piece.out_bits
    assert base is not None
    args = (
        np.array(weights, np.float32),
        total is not None,
        np.float32(total if total is not None else 1.0),
        np.float32(lam),
    )
    m = len(xs)

    def part(k: int, lo: int, hi: int, sums: np.ndarray, counts: np.ndarray) -> bool:
        return bool(_sum(xs, base, *args, out, lo, hi, sums, counts))

    sums = run_parts(out.shape[0], m, part)
    if sums is None:
        return None
    return Merged(piece.out, [None] * m, sums, checked=True)


@functools.cache
def agrees_with_torch() -> bool:
    """Whether the loop reproduces torch's passes bit for bit on this CPU (a sample of 4099
    entries: vector lanes and a tail; the sums, the division, ·λ + θ0)."""
    g = torch.Generator().manual_seed(0)
    base, *xs = (torch.randn(4099, generator=g) for _ in range(4))
    weights = [1 / 3, 0.7, -1.3]
    want = torch.zeros_like(base)
    for x, w in zip(xs, weights, strict=True):
        want.add_(x - base, alpha=w)
    want /= 0.37
    want.mul_(0.9).add_(base)
    piece = stored(TensorInputs("sample", base, list(xs), [None] * 3), with_base=True)
    got = None if piece is None else _run(piece, weights, 0.37, 0.9)
    return (
        piece is not None
        and got is not None
        and torch.equal(piece.out.view(torch.int32), want.view(torch.int32))
    )
