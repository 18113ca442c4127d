"""The report's sums (compiled loop and torch path) against dense formulas: float64 sums equal
within float64 rounding noise, counts exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergecli.engine.figures as figures
from mergecli.engine.figures import PieceFigures
from mergecli.methods import TensorInputs
from tests.conftest import EXPERTS
from tests.helpers import load_state, read_json, run_cli, write_recipe


def dense(tvs: list[torch.Tensor], delta: torch.Tensor) -> dict[str, list]:
    """The figures from whole-tensor float64 reductions and boolean masks."""
    d = delta.double()
    return {
        "delta_sq": [float((d * d).sum())],
        "tv_sq": [float((tv.double() ** 2).sum()) for tv in tvs],
        "dot": [float((tv.double() * d).sum()) for tv in tvs],
        "both": [int(((tv != 0) & (delta != 0)).sum()) for tv in tvs],
        "same": [int((((tv > 0) & (delta > 0)) | ((tv < 0) & (delta < 0))).sum()) for tv in tvs],
        "kept": [int((tv != 0).sum()) / tv.numel() for tv in tvs],
    }


def piece(dtype: torch.dtype, seed: int = 0) -> tuple[TensorInputs, torch.Tensor]:
    """Three experts around a base with zeros in the task vectors and in the merged delta."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(300, 70, generator=gen, dtype=dtype)
    experts = []
    for t in range(3):
        tv = torch.randn(300, 70, generator=gen, dtype=dtype)
        tv[torch.rand(300, 70, generator=gen) < 0.2 * t] = 0
        experts.append(base + tv)
    merged = base + torch.randn(300, 70, generator=gen, dtype=dtype)
    merged[:40] = base[:40]  # a delta of zero there
    return TensorInputs("w", base, experts, [None] * 3), merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_piece_sums_equal_dense_formulas(
    dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch":
        monkeypatch.setattr(figures, "COMPILED_DTYPES", ())
        monkeypatch.setattr(figures, "BLOCK", 1000)  # several blocks
    inputs, merged = piece(dtype)
    want = dense([(e - inputs.base) for e in inputs.expert_weights], merged - inputs.base)
    got = PieceFigures()(inputs, merged, [None] * 3)
    assert got["size"] == merged.numel()
    assert got["both"] == want["both"] and got["same"] == want["same"]
    assert got["kept"] == want["kept"]
    assert 0 < want["both"][2] < want["both"][0]  # zeros really change the counts
    for key in ("delta_sq", "tv_sq", "dot"):
        values = got[key] if isinstance(got[key], list) else [got[key]]
        assert values == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_compiled_and_torch_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, merged = piece(torch.float32, seed=1)
    compiled = PieceFigures()(inputs, merged, [None] * 3)
    monkeypatch.setattr(figures, "COMPILED_DTYPES", ())
    reduced = PieceFigures()(inputs, merged, [None] * 3)
    assert compiled.keys() == reduced.keys()
    for key, value in reduced.items():
        assert compiled[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_kept_reported_by_the_method_is_kept(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "torch":
        monkeypatch.setattr(figures, "COMPILED_DTYPES", ())
    inputs, merged = piece(torch.float32)
    got = PieceFigures()(inputs, merged, [0.5, None, 0.25])
    assert got["kept"][0] == 0.5 and got["kept"][2] == 0.25
    assert got["kept"][1] == pytest.approx(float((inputs.expert_deltas[1] != 0).float().mean()))


def test_no_base_reports_kept_only() -> None:
    inputs = TensorInputs("w", None, [torch.ones(3)], [None])
    assert PieceFigures()(inputs, torch.ones(3), [0.5]) == {"kept": [0.5], "size": 3}


@pytest.mark.slow  # three merges through the CLI
def test_summary_report_keeps_the_totals_without_tensor_rows(zoo: Path, tmp_path: Path) -> None:
    """``report: summary`` (recipe key, or ``--report`` over it) writes the same totals as
    ``full``, which adds a row per merged tensor; a bad value is one line, exit 2."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in EXPERTS],
    }
    full = write_recipe(tmp_path, recipe, "full.yaml")
    summary = write_recipe(tmp_path, {**recipe, "report": "summary"}, "summary.yaml")
    runs = {"full": (full,), "summary": (summary,), "option": (full, "--report", "summary")}
    reports = {}
    for label, args in runs.items():
        result = run_cli("merge", *args, "--output", tmp_path / label, "--quiet")
        assert result.exit_code == 0, result.output
        reports[label] = read_json(tmp_path / label / "merge_report.json")
    floats = {n for n, v in load_state(zoo / "base").items() if v.is_floating_point()}
    assert set(reports["full"]["tensors"]) == floats
    for label in ("summary", "option"):
        assert "tensors" not in reports[label]
        assert reports[label]["totals"] == reports["full"]["totals"]
    assert reports["summary"]["recipe"]["report"] == "summary"
    assert "report" not in reports["full"]["recipe"]  # the default is not written
    bad = run_cli("merge", full, "--output", tmp_path / "bad", "--report", "rows")
    assert bad.exit_code == 2 and "--report" in bad.output and "Traceback" not in bad.output
