"""The compiled TIES pass against the torch passes it replaces, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from mergecli.methods.sparsify import disjoint_merge, elect_sign, magnitude_trim, shrink_below
from mergecli.methods.ties_kernel import fused_ties


def torch_passes(
    tvs: list[torch.Tensor],
    thresholds: list[float],
    weights: list[float],
    lam: float,
    base: torch.Tensor,
    sign: str,
    merge_func: str,
) -> tuple[torch.Tensor, list[int]]:
    trimmed = [magnitude_trim(tv, k) for tv, k in zip(tvs, thresholds, strict=True)]
    merged = disjoint_merge(trimmed, weights, elect_sign(trimmed, sign), merge_func)
    assert isinstance(merged.value, torch.Tensor)
    counts = [round((k or 0.0) * base.numel()) for k in merged.kept]
    return merged.value.mul_(lam).add_(base), counts


def inputs(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three task vectors with repeated values (ties at thresholds, cancelling sums,
    zeros of both signs)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    grid = torch.tensor([-0.0, 0.0, 0.5, -0.5, 0.25, -0.25, 1e-3, 3.0])
    tvs = [grid[torch.randint(0, len(grid), (n,), generator=g)] for _ in range(2)]
    tvs.append(torch.randn(n, generator=g) * 0.3)
    return base, tvs


@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("merge_func", ["mean", "sum"])
@pytest.mark.parametrize(
    ("weights", "thresholds"),
    [
        ([1.0, 0.5, 2.0], [0.25, 0.5, 0.3]),
        ([1.0, -1.0, 0.3], [0.0, 0.25, math.inf]),  # Σ w over agreeing experts may be 0
        ([0.7, 0.7, 0.7], [math.inf, math.inf, math.inf]),  # nothing kept
    ],
)
@pytest.mark.parametrize("n", [5, 3000, 600_000])  # one block, several, several threads
def test_fused_equals_torch_passes(
    sign: str, merge_func: str, weights: list[float], thresholds: list[float], n: int
) -> None:
    base, tvs = inputs(n, n)
    want, counts = torch_passes(tvs, thresholds, weights, 0.9, base, sign, merge_func)
    below = [shrink_below(k, torch.float32) for k in thresholds]
    result = fused_ties(tvs, below, weights, 0.9, base, sign == "count", merge_func == "mean")
    assert result is not None
    got, got_counts = result
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert got_counts == counts


def test_no_trim_keeps_every_entry() -> None:
    """A shrink at -inf keeps every entry, as DARE-TIES' election on the dropped vectors."""
    base, tvs = inputs(4000, 1)
    want, counts = torch_passes(tvs, [0.0] * 3, [1.0] * 3, 1.0, base, "mass", "mean")
    result = fused_ties(tvs, [-math.inf] * 3, [1.0] * 3, 1.0, base, False, True)
    assert result is not None
    assert torch.equal(result[0].view(torch.int32), want.view(torch.int32))
    assert result[1] == counts


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_entry_declines(bad: float) -> None:
    base, tvs = inputs(5000, 2)
    tvs[1][4321] = bad
    assert fused_ties(tvs, [0.1] * 3, [1.0] * 3, 1.0, base, False, True) is None
