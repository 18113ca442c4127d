"""conventions: mergekit computes in mergekit 0.1.5's dtype: bfloat16 merges against formulas
written here in bfloat16 (each operation rounded to bfloat16, as mergekit's tensors are)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergecli
from mergecli.engine.merge import merge_state
from mergecli.methods import mergekit
from mergecli.recipe import recipe_from_dict
from tests.helpers import load_state
from tests.test_conventions import plan

BF16 = torch.bfloat16
WEIGHTS = (0.6, 0.4)

Formula = Callable[[torch.Tensor, list[torch.Tensor], torch.dtype], tuple[Any, ...]]
"""(base, task vectors, dtype) → (merged, entries whose selection the formula decides)."""


def merge(zoo: Path, method: str, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / n), "parameters": {"weight": w}}
            for n, w in zip(("math", "code"), WEIGHTS, strict=True)
        ],
        "parameters": parameters,
        "dtype": "bfloat16",
        "conventions": "mergekit",
        **extra,
    }
    return merge_state(mergecli.plan_merge(recipe_from_dict(data)))


def weighted(tvs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """wt·τt with wt held in ``dtype`` (bfloat16 0.6 is 0.6015625)."""
    return [tv * torch.tensor(w, dtype=dtype) for tv, w in zip(tvs, WEIGHTS, strict=True)]


def top_k(tv: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k = max(1, ⌊density·n⌋) largest magnitudes kept; entries tied with the k-th are
    undecided (mergekit picks among them by its sort)."""
    m = tv.abs().reshape(-1).double()
    kth = m.sort(descending=True).values[max(1, int(density * m.numel())) - 1]
    magnitude = tv.abs().double()
    return tv * (magnitude > kth), magnitude != kth


def ties(base: torch.Tensor, tvs: list[torch.Tensor], dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """TIES in dtype ``dt``: top 30 %, weighted, sign of Σ wt τ̂t, agreeing sum ÷ agreeing Σ wt."""
    (a, ok_a), (b, ok_b) = (top_k(tv.to(dt), 0.3) for tv in tvs)
    x, y = weighted([a, b], dt)
    gamma = torch.where(x + y >= 0, 1.0, -1.0).to(dt)
    agree_x, agree_y = (x.sign() == gamma).to(dt), (y.sign() == gamma).to(dt)
    w_x, w_y = (torch.tensor(w, dtype=dt) for w in WEIGHTS)
    divisor = w_x * agree_x + w_y * agree_y
    divisor[divisor == 0] = 1
    return base.to(dt) + (x * agree_x + y * agree_y) / divisor, ok_a & ok_b


def outlier_window(tv: torch.Tensor, density: float, gamma: float) -> tuple[torch.Tensor, ...]:
    """Of the magnitudes sorted ascending, positions [b, b + ⌊density·n⌋) kept with
    b = n − ⌊density·n⌋ − ⌊gamma·n⌋; entries tied with a window edge are undecided."""
    m = tv.abs().reshape(-1).double().sort().values
    n = m.numel()
    target, low = int(density * n), n - int(density * n) - int(gamma * n)
    lo = m[low]
    hi = m[low + target] if low + target < n else torch.tensor(float("inf"), dtype=m.dtype)
    magnitude = tv.abs().double()
    return tv * ((magnitude > lo) & (magnitude < hi)), (magnitude != lo) & (magnitude != hi)


def breadcrumbs(base: torch.Tensor, tvs: list[torch.Tensor], dt: torch.dtype) -> tuple[Any, ...]:
    """Breadcrumbs in dtype ``dt``: density 0.5, gamma 0.1, Σ wt τ̂t ÷ Σ wt (normalize)."""
    (a, ok_a), (b, ok_b) = (outlier_window(tv.to(dt), 0.5, 0.1) for tv in tvs)
    x, y = weighted([a, b], dt)
    w_x, w_y = (torch.tensor(w, dtype=dt) for w in WEIGHTS)
    return base.to(dt) + (x + y) / (w_x + w_y), ok_a & ok_b


def task_arithmetic(base: torch.Tensor, tvs: list[torch.Tensor], dt: torch.dtype) -> Any:
    """Task arithmetic in dtype ``dt``: θ0 + 0.9 · Σ wt τt."""
    x, y = weighted([tv.to(dt) for tv in tvs], dt)
    return base.to(dt) + (x + y) * 0.9, torch.ones(base.shape, dtype=torch.bool)


def ramplus_tl(
    base: torch.Tensor, tvs: list[torch.Tensor], dt: torch.dtype, wide: torch.dtype
) -> Any:
    """RAM+ (r 0.1, α 0.2, ε 1e-5) with mergekit's promotions for ``wide`` float32: entry
    counts and ρt in ``wide``, unique entries scaled in ``wide``, shared ones divided by their
    count in ``dt``, the sum and θ0 + Σ in ``wide``, the result stored in ``dt``."""
    tvs = [tv.to(dt) for tv in tvs]
    active = [tv.abs() > 1e-5 for tv in tvs]
    count = sum(a.long() for a in active)
    total = torch.zeros(base.shape, dtype=wide)
    for tv, a in zip(tvs, active, strict=True):
        mine_alone, mine_shared = a & (count == 1), a & (count > 1)
        n_shared, n_alone = (x.sum().to(wide) for x in (mine_shared, mine_alone))
        scale = 1 + 0.1 * (n_shared / n_alone.clamp(min=1e-5)).clamp(0, 0.2)
        alone = (tv * mine_alone).to(wide) * scale
        shared = tv * mine_shared / count.clamp(min=1)
        total = total + (alone + shared)
    return (base.to(dt) + total).to(dt)


CASES: dict[str, tuple[dict[str, Any], Formula]] = {
    "ties": ({"density": 0.3}, ties),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.1, "normalize": True}, breadcrumbs),
    "task_arithmetic": ({"lambda": 0.9}, task_arithmetic),
}


@pytest.mark.parametrize("method", list(CASES))
def test_mergekit_bf16_merge_equals_a_bfloat16_formula(zoo: Path, method: str) -> None:
    """Every entry the formula decides equals it bit for bit in bfloat16, and a float32
    computation of the same formula differs: the merge computes in bfloat16."""
    parameters, formula = CASES[method]
    merged = merge(zoo, method, parameters)
    states = {n: load_state(zoo / n) for n in ("base", "math", "code")}
    decided = total = 0
    upcast_differs = False
    for name, got in merged.items():
        base = states["base"][name].to(BF16)
        tvs = [states[n][name].to(BF16) - base for n in ("math", "code")]
        want, ok = formula(base, tvs, BF16)
        assert got.dtype == BF16
        assert torch.equal(got[ok], want[ok]), name
        upcast, _ = formula(base.float(), [tv.float() for tv in tvs], torch.float32)
        upcast_differs |= not torch.equal(upcast.to(BF16)[ok], got[ok])
        decided, total = decided + int(ok.sum()), total + ok.numel()
    assert decided > 0.9 * total
    assert upcast_differs


def test_compute_dtype_follows_mergekit_per_method(zoo: Path, zoo_bf16: Path) -> None:
    def compute(zoo_: Path, method: str, **extra: Any) -> torch.dtype:
        return plan(zoo_, method, **extra).compute_dtype

    assert compute(zoo, "ties", dtype="bfloat16", conventions="mergekit") == BF16
    assert compute(zoo, "ties", dtype="bfloat16") == torch.float32
    assert compute(zoo, "linear", dtype="bfloat16", conventions="mergekit") == torch.float32
    assert compute(zoo, "linear", dtype="float64", conventions="mergekit") == torch.float64
    assert compute(zoo_bf16, "ties", conventions="mergekit") == BF16  # unset: as stored
    assert compute(zoo_bf16, "ties") == torch.float32


def test_unset_dtype_stays_unset_under_mergekit(zoo_bf16: Path) -> None:
    """mergekit writes in dtype only when the recipe gives it (else as stored)."""
    assert plan(zoo_bf16, "linear", conventions="mergekit").out_dtype == BF16
    assert plan(zoo_bf16, "linear", dtype="fp32", conventions="mergekit").out_dtype == torch.float32


def test_mergekit_top_k_keeps_exactly_k_among_tied_magnitudes() -> None:
    tv = torch.tensor([0.5, -0.25, 0.25, 0.25, -0.25, 0.125, 1.0, -0.25], dtype=BF16)
    kept = mergekit.magnitude(tv, 0.5, rescale=False)  # k = 4: 1, 0.5 and two of four 0.25s
    assert int((kept != 0).sum()) == 4
    assert kept[6] == 1.0 and kept[0] == 0.5 and kept[5] == 0
    assert bool(((kept == 0) | (kept == tv)).all())


def test_mergekit_bf16_ramplus_tl_counts_in_float32(zoo: Path) -> None:
    """RAM+ in bfloat16 equals mergekit's promotions bit for bit (ρt from float32 counts);
    counting in bfloat16 (counts above 256 rounded) gives another model."""
    merged = merge(zoo, "ramplus_tl", {})
    states = {n: load_state(zoo / n) for n in ("base", "math", "code")}
    rounded_counts_differ = False
    for name, got in merged.items():
        base = states["base"][name].to(BF16)
        tvs = [states[n][name].to(BF16) - base for n in ("math", "code")]
        assert torch.equal(got, ramplus_tl(base, tvs, BF16, torch.float32)), name
        rounded_counts_differ |= not torch.equal(got, ramplus_tl(base, tvs, BF16, BF16))
    assert rounded_counts_differ
