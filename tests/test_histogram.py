"""The compiled digit histogram against torch's bincount of the same bit patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergecli.methods import sparsify
from mergecli.methods.histogram import add_digits


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_equals_kthvalue(dtype: torch.dtype) -> None:
    x = torch.randn(3001, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x[:500] = 0
    x[500:700] = x[700:900].neg()  # ties
    for rank in (1, 2, 150, 1000, 2400, 2501, 2502, 3001):
        got = sparsify.kth_largest(x, rank)
        assert got == float(torch.kthvalue(x.abs(), x.numel() - rank + 1).values), rank
