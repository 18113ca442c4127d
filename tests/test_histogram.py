"""The compiled digit histogram against torch's bincount of the same bit patterns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergecli.methods import sparsify
from mergecli.methods.histogram import BLOCK, add_difference_digits, add_digits
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.statistics import Handle, TensorKthLargestMagnitude


@pytest.mark.parametrize(
    ("dtype", "int_dtype", "shifts"),
    [
        (torch.float32, torch.int32, (16, 0)),
        (torch.float64, torch.int64, (48, 32)),
    ],
)
def test_digits_equal_bincount(dtype: torch.dtype, int_dtype: torch.dtype, shifts) -> None:
    x = torch.randn(5000, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x[:100] = 0
    x[100:200] = -x[200:300]  # equal magnitudes of both signs
    pattern = x.abs().view(int_dtype)
    first, second = shifts
    hist = np.zeros(1 << 16, dtype=np.int64)
    add_digits(x.view(int_dtype).numpy(), first, -1, hist)
    want = torch.bincount((pattern >> first) & 0xFFFF, minlength=1 << 16)
    assert np.array_equal(hist, want.numpy())
    prefix = int(np.argmax(hist))  # one of the fullest bins, refined
    hist = np.zeros(1 << 16, dtype=np.int64)
    add_digits(x.view(int_dtype).numpy(), second, prefix, hist)
    selected = pattern[(pattern >> (second + 16)) == prefix]
    want = torch.bincount((selected >> second) & 0xFFFF, minlength=1 << 16)
    assert np.array_equal(hist, want.numpy()) and hist.sum() > 1


@pytest.mark.parametrize("shift", [16, 0])
def test_difference_digits_equal_bincount_of_the_task_vector(shift: int) -> None:
    """Digits of weight − base formed block by block (over several blocks and a partial one)
    equal torch's bincount over the stored float32 difference."""
    g = torch.Generator().manual_seed(2)
    weight, base = (
        torch.randn(2 * BLOCK + 77, generator=g),
        torch.randn(2 * BLOCK + 77, generator=g),
    )
    weight[:300] = base[:300]  # zero task-vector entries
    pattern = (weight - base).abs().view(torch.int32)
    prefix = -1 if shift == 16 else int(torch.mode(pattern >> 16).values)
    hist = np.zeros(1 << 16, dtype=np.int64)
    add_difference_digits(weight.numpy(), base.numpy(), shift, prefix, hist)
    selected = pattern if prefix < 0 else pattern[(pattern >> 16) == prefix]
    want = torch.bincount((selected >> shift) & 0xFFFF, minlength=1 << 16)
    assert np.array_equal(hist, want.numpy()) and hist.sum() > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_equals_kthvalue(dtype: torch.dtype) -> None:
    x = torch.randn(3001, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x[:500] = 0
    x[500:700] = x[700:900].neg()  # ties
    for rank in (1, 2, 150, 1000, 2400, 2501, 2502, 3001):
        got = sparsify.kth_largest(x, rank)
        assert got == float(torch.kthvalue(x.abs(), x.numel() - rank + 1).values), rank


@pytest.mark.parametrize(
    ("dtype", "stored"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float32, torch.bfloat16),  # handed on as stored: widened in the loop
    ],
)
def test_tensor_thresholds_from_row_pieces_equal_kthvalue(
    dtype: torch.dtype, stored: torch.dtype
) -> None:
    """Per tensor and expert, the k-th largest abs(τ) (k = ceil(density·n)) from histograms
    summed over the tensor's row pieces, pass after pass, equals kthvalue on the whole tensor
    (τ formed in ``dtype`` from inputs ``stored``); a tensor the statistic does not name is
    skipped by the runner, not here."""
    gen = torch.Generator().manual_seed(2)

    def grid(shape: tuple[int, int], step: float) -> torch.Tensor:
        """Multiples of ``step`` (exact sums: many ties and zeros in the task vectors)."""
        return torch.randint(-6, 7, shape, generator=gen).to(stored) * step

    base = {"a": grid((40, 30), 0.25), "b": grid((7, 3), 0.25)}
    experts = [{k: v + grid(tuple(v.shape), 0.125) for k, v in base.items()} for _ in range(2)]
    experts[1]["a"][20:] += torch.randn(20, 30, generator=gen, dtype=stored)  # and distinct ones
    densities = {"a": [0.3, 0.05], "b": [1.0, 0.0]}
    statistic = TensorKthLargestMagnitude(Handle("t"), densities)
    assert statistic.passes(dtype) == (2 if dtype == torch.float32 else 4)
    pieces = {"a": [(0, 13), (13, 26), (26, 40)], "b": [(0, 7)]}
    while statistic.wants_pass():
        for name, rows in pieces.items():
            for start, stop in rows:
                inputs = TensorInputs(
                    name,
                    base[name][start:stop].clone(),
                    [e[name][start:stop].clone() for e in experts],
                    [None, None],
                )
                statistic.observe(inputs)
        statistic.end_pass()
    got = statistic.value()
    for name, ds in densities.items():
        for t, d in enumerate(ds):
            tv = (experts[t][name].to(dtype) - base[name].to(dtype)).abs().flatten()
            k = math.ceil(round(d * tv.numel(), 9))
            want = float("inf") if k == 0 else float(torch.kthvalue(tv, tv.numel() - k + 1).values)
            assert got[name][t] == want, (name, t)
