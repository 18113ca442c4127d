"""The compiled merges of inputs as stored (``methods/stored.py``, ``sum_kernel``,
``ties_kernel.stored_ties``) against the torch passes they replace, bit for bit, their report
sums against dense formulas, and the finite-value guard they take over."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecli.methods import sum_kernel
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.philox import _keep, keep_lanes
from mergecli.methods.result import Merged, PieceSums
from mergecli.methods.sparsify import (
    dare_drop,
    disjoint_merge,
    elect_sign,
    magnitude_trim,
    shrink_below,
)
from mergecli.methods.stored import bits, narrow, narrowing_agrees
from mergecli.methods.ties_kernel import stored_ties
from tests.helpers import run_cli, write_recipe

pytestmark = pytest.mark.skipif(
    not sum_kernel.agrees_with_torch(),
    reason="torch's add_ does not round like a fused multiply-add here: the loop is not used",
)


def weights_like(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three experts of n entries (weights of scale 0.02, experts base + noise,
    some entries equal to the base: zero task-vector entries)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, generator=g) * 0.02
    experts = [base + torch.randn(n, 3, generator=g) * 0.005 for _ in range(3)]
    experts[1][: n // 3] = base[: n // 3]
    return base.to(dtype), [e.to(dtype) for e in experts]


def stored_inputs(
    base: torch.Tensor | None, experts: list[torch.Tensor], out_dtype: torch.dtype | None
) -> TensorInputs:
    return TensorInputs(
        "model.layers.0.mlp.up_proj.weight",
        base,
        list(experts),
        [None] * len(experts),
        seed=7,
        as_stored=True,
        out_dtype=out_dtype,
    )


def dense_sums(tvs: list[torch.Tensor], delta: torch.Tensor) -> PieceSums:
    """The report's sums by their definition, in float64."""
    d = delta.double().reshape(-1)
    x = [tv.double().reshape(-1) for tv in tvs]
    return PieceSums(
        tv_sq=[float(v @ v) for v in x],
        delta_sq=float(d @ d),
        dot=[float(v @ d) for v in x],
        nonzero=[int((v != 0).sum()) for v in x],
        both=[int(((v != 0) & (d != 0)).sum()) for v in x],
        same=[int((torch.sign(v) * torch.sign(d) > 0).sum()) for v in x],
    )


def assert_sums(got: PieceSums | None, want: PieceSums) -> None:
    assert got is not None
    for a, b in [
        (got.delta_sq, want.delta_sq),
        *zip(got.tv_sq + got.dot, want.tv_sq + want.dot, strict=True),
    ]:
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300)
    assert (got.nonzero, got.both, got.same) == (want.nonzero, want.both, want.same)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and bool((bits(a.contiguous()) == bits(b.contiguous())).all())


def wide(experts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [e.float() for e in experts]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float32, None])
@pytest.mark.parametrize("n", [5, 3000, 700_000])  # one block, several, several parts
def test_task_arithmetic_equals_torch_passes(
    stored: torch.dtype, out: torch.dtype | None, n: int
) -> None:
    base, experts = weights_like(n, n, stored)
    weights, lam, total = [0.7, -0.2, 1.9], 0.9, 2.4
    b, xs = base.float(), wide(experts)
    tvs = [x - b for x in xs]
    want = torch.zeros_like(b)
    for tv, w in zip(tvs, weights, strict=True):
        want.add_(tv, alpha=w)
    want /= total
    want.mul_(lam).add_(b)
    merged = sum_kernel.task_arithmetic_sum(stored_inputs(base, experts, out), weights, total, lam)
    assert isinstance(merged, Merged) and merged.checked
    assert isinstance(merged.value, torch.Tensor)
    assert same_bits(merged.value, want.to(out or torch.float32))
    assert merged.kept == [None] * 3
    assert_sums(merged.sums, dense_sums(tvs, want - b))


def test_report_sums_do_not_depend_on_the_thread_count() -> None:
    base, experts = weights_like(900_000, 3, torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            inputs = stored_inputs(base, experts, torch.bfloat16)
            results.append(sum_kernel.task_arithmetic_sum(inputs, [1 / 3] * 3, None, 1.0))
    finally:
        torch.set_num_threads(before)
    assert all(r is not None for r in results)
    assert results[0].sums == results[1].sums == results[2].sums  # type: ignore[union-attr]


def torch_ties(
    base: torch.Tensor,
    tvs: list[torch.Tensor],
    below: list[float],
    weights: list[float],
    lam: float,
) -> tuple[torch.Tensor, list[float]]:
    trimmed = [torch.nn.functional.hardshrink(tv, k) for tv, k in zip(tvs, below, strict=True)]
    merged = disjoint_merge(trimmed, weights, elect_sign(trimmed, "mass"), "mean")
    assert isinstance(merged.value, torch.Tensor)
    return merged.value.mul_(lam).add_(base), [k or 0.0 for k in merged.kept]


@pytest.mark.parametrize("n", [5, 3000, 700_000])
def test_ties_equals_torch_passes(n: int) -> None:
    base, experts = weights_like(n, n + 1, torch.bfloat16)
    b, xs = base.float(), wide(experts)
    tvs = [x - b for x in xs]
    thresholds = [0.004, 0.003, 0.0]
    below = [shrink_below(k, torch.float32) for k in thresholds]
    want, kept = torch_ties(b, tvs, below, [1.0, 0.5, 2.0], 0.9)
    inputs = stored_inputs(base, experts, torch.bfloat16)
    merged = stored_ties(inputs, below, [1.0, 0.5, 2.0], 0.9, count=False, mean=True)
    assert merged is not None and merged.checked
    assert isinstance(merged.value, torch.Tensor)
    assert same_bits(merged.value, want.to(torch.bfloat16))
    assert merged.kept == pytest.approx(kept, abs=0)
    assert_sums(merged.sums, dense_sums(tvs, want - b))
    trimmed = [magnitude_trim(tv, k) for tv, k in zip(tvs, thresholds, strict=True)]
    assert all(
        torch.equal(t, torch.nn.functional.hardshrink(tv, k))
        for t, tv, k in zip(trimmed, tvs, below, strict=True)
    )


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("offset_rows", [0, 1234])  # a row chunk draws its part of the mask
def test_dare_ties_equals_torch_passes(rescale: bool, offset_rows: int) -> None:
    base, experts = weights_like(400_000, 5, torch.bfloat16)
    b, xs = base.float(), wide(experts)
    density = [0.5, 0.3, 0.9]
    full = stored_inputs(b, xs, None)
    part = full.rows(offset_rows, 400_000) if offset_rows else full
    tvs = part.task_vectors()
    dropped = [dare_drop(part, t, tv, density[t], rescale)[0] for t, tv in enumerate(tvs)]
    want, kept = torch_ties(part.base, dropped, [-math.inf] * 3, [1.0] * 3, 1.0)  # type: ignore[arg-type]
    inputs = stored_inputs(base, experts, torch.bfloat16)
    inputs = inputs.rows(offset_rows, 400_000) if offset_rows else inputs
    merged = stored_ties(
        inputs, [-math.inf] * 3, [1.0] * 3, 1.0, count=False, mean=True, dare=(density, rescale)
    )
    assert merged is not None and isinstance(merged.value, torch.Tensor)
    assert same_bits(merged.value, want.to(torch.bfloat16))
    assert merged.kept == pytest.approx(kept, abs=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["base", "expert"])
def test_non_finite_input_declines(bad: float, where: str) -> None:
    base, experts = weights_like(5000, 2, torch.bfloat16)
    (base if where == "base" else experts[1])[4321, 1] = bad
    inputs = stored_inputs(base, experts, torch.bfloat16)
    assert sum_kernel.task_arithmetic_sum(inputs, [1.0] * 3, None, 1.0) is None
    assert stored_ties(inputs, [0.0] * 3, [1.0] * 3, 1.0, count=False, mean=True) is None


def test_overflow_in_the_output_dtype_declines() -> None:
    """A float32 result beyond bfloat16's range would round to infinity: the torch passes and
    the finite-value guard decide instead."""
    base = torch.zeros(100)
    experts = [torch.full((100,), 3.3999e38), torch.zeros(100), torch.zeros(100)]
    inputs = stored_inputs(base, experts, torch.bfloat16)
    assert sum_kernel.task_arithmetic_sum(inputs, [1.0] * 3, None, 1.0) is None
    fine = stored_inputs(base, experts, torch.float32)
    assert sum_kernel.task_arithmetic_sum(fine, [1.0] * 3, None, 1.0) is not None


def test_rounding_to_bfloat16_equals_torch() -> None:
    assert narrowing_agrees()
    specials = torch.tensor(
        [0.0, -0.0, 1e-40, -1e-40, 3.3895e38, -3.3895e38, 1.00390625, 1.01171875, 65504.0]
    )
    got = torch.empty(specials.shape, dtype=torch.bfloat16)
    narrow(bits(specials), bits(got))
    assert same_bits(got, specials.to(torch.bfloat16))


@pytest.mark.parametrize("offset", [0, 1, 3, 6, 4097])
@pytest.mark.parametrize("n", [1, 3, 2047, 2048])
def test_philox_lanes_equal_the_serial_loop(offset: int, n: int) -> None:
    key = np.uint64(0x243F6A8885A308D3)
    want, got = np.empty(n, np.bool_), np.empty(n, np.bool_)
    _keep(key, offset, np.array([0.37]), want)
    keep_lanes(key, offset, 0.37, got, np.empty(n + 8, np.uint64))
    assert (want == got).all()


def bf16_family(root: Path) -> None:
    """A bfloat16 base and two experts of one 600 × 4096 tensor (streamed in row chunks)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(600, 4096, generator=g) * 0.02
    for name, x in [
        ("base", base),
        *((f"e{t}", base + 0.01 * torch.randn(600, 4096, generator=g)) for t in range(2)),
    ]:
        (root / name).mkdir()
        save_file(
            {"model.layers.0.mlp.up_proj.weight": x.to(torch.bfloat16)},
            root / name / "model.safetensors",
        )


def test_nan_in_a_bfloat16_expert_is_named_after_the_compiled_merge(tmp_path: Path) -> None:
    """The merge pass reads bfloat16 as stored without checking it as read; a NaN still gets
    the one-line error naming the tensor, the file and the expert, and nothing is written."""
    bf16_family(tmp_path)
    path = tmp_path / "e1" / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.weight"][300, 17] = float("nan")
    save_file(state, path)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        recipe = write_recipe(
            tmp_path,
            {
                "merge_method": method,
                "base_model": str(tmp_path / "base"),
                "models": [{"model": str(tmp_path / "e0")}, {"model": str(tmp_path / "e1")}],
                "parameters": {"density": 0.5} if method != "task_arithmetic" else {},
            },
        )
        result = run_cli("merge", recipe, "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, result.output
        line = result.stderr.strip().splitlines()[-1]  # after ties' defaults warning
        assert line.startswith("error: models[1].model") and str(path) in line, line
        assert not (tmp_path / "out").exists()
