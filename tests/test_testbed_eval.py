"""Every evaluation-driven command end to end on the reduced real testbed (scripts/testbed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from mergecli.evaluate import Scorer
from mergecli.recipe import load_recipe
from tests.helpers import run_cli, write_recipe

pytestmark = pytest.mark.slow  # builds and trains the real testbed


def manifest(testbed: Path) -> dict:
    return json.loads((testbed / "testbed.json").read_text())


def bed_recipe(
    testbed: Path,
    name: str,
    folder: str,
    limit: int | None = None,
    experts: int | None = None,
    **extra: object,
) -> Path:
    """A recipe over the testbed's experts (or runs): the first ``experts`` of them (all by
    default), ``limit`` validation examples per task."""
    tasks = manifest(testbed)["tasks"][:experts]
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"{folder}/{t}", "name": t} for t in tasks],
        "parameters": {"lambda": 0.3},
        "evaluate": {
            "metric": "accuracy",
            "data": "data/{task}/validation.jsonl",
            "batch_size": 64,
        },
        **extra,
    }
    return write_recipe(testbed, spec, name)


def test_sweep_finds_the_testbeds_task_arithmetic_lambda(testbed: Path, tmp_path: Path) -> None:
    """The testbed's builder picks λ by an exhaustive validation search of its own."""
    path = bed_recipe(testbed, "tb-ta.yaml", "experts")
    out = tmp_path / "best"
    result = run_cli("sweep", path, "--grid", "lambda=0.1:1.0:0.1", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert table["best"]["parameters"]["lambda"] == manifest(testbed)["task_arithmetic_lambda"]
    rescored = run_cli("evaluate", path, "--model", out, "--json")
    assert json.loads(rescored.stdout)["rows"][0]["score"] == pytest.approx(table["best"]["score"])


def test_greedy_soup_on_the_testbed(testbed: Path, tmp_path: Path) -> None:
    path = bed_recipe(
        testbed, "tb-soup.yaml", "experts", 40, 4, merge_method="greedy_soup", parameters={}
    )
    result = run_cli("merge", path, "-o", tmp_path / "soup", "--json")
    assert result.exit_code == 0, result.output
    soup = json.loads(result.stdout)["greedy_soup"]
    scores = soup["expert_scores"]
    assert list(scores) == sorted(scores, key=lambda n: -scores[n])
    kept = [s for s in soup["steps"] if s["kept"]]
    assert [s["expert"] for s in kept] == soup["selected"]
    assert all(b["score"] > a["score"] for a, b in itertools.pairwise(kept))
    rescored = run_cli("evaluate", path, "--model", tmp_path / "soup", "--json")
    assert json.loads(rescored.stdout)["rows"][0]["score"] == pytest.approx(kept[-1]["score"])


def test_duration_sweep_finds_the_testbeds_best_steps(testbed: Path, tmp_path: Path) -> None:
    path = bed_recipe(testbed, "tb-runs.yaml", "runs")
    out = tmp_path / "durations"
    result = run_cli(
        "sweep", path, "--over-checkpoints", "--multiples", "0.5,1", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    runs = manifest(testbed)["runs"]
    assert sweep["tstar"] == {t: run["best_step"] for t, run in runs.items()}
    at_tstar = next(p for p in sweep["points"] if p["x"] == 1.0)
    experts = Scorer(load_recipe(bed_recipe(testbed, "tb-ta2.yaml", "experts")))
    expected = experts.expert_scores(load_recipe(testbed / "tb-ta2.yaml"))
    assert at_tstar["experts"] == pytest.approx(expected)
    assert (out / "durations.png").stat().st_size > 0


def test_landscape_between_two_testbed_experts(testbed: Path, tmp_path: Path) -> None:
    tasks = manifest(testbed)["tasks"]
    path = bed_recipe(testbed, "tb-land.yaml", "experts", 40)
    out = tmp_path / "landscape"
    result = run_cli(
        "analyze",
        "landscape",
        path,
        "--models",
        f"{tasks[0]},{tasks[1]}",
        "--alphas",
        "0:1:0.5",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    land = json.loads(result.stdout)
    spec = load_recipe(path)
    spec.evaluate.metric = "loss"  # type: ignore[union-attr]
    scorer = Scorer(spec)
    ends = [scorer.model(testbed / "experts" / t) for t in tasks[:2]]
    for task in tasks[:2]:
        assert land["tasks"][task][0] == pytest.approx(ends[0].tasks[task], abs=1e-5)
        assert land["tasks"][task][-1] == pytest.approx(ends[1].tasks[task], abs=1e-5)
    assert land["barrier"] == pytest.approx(
        max(land["mean"]) - (land["mean"][0] + land["mean"][-1]) / 2
    )
    assert (out / "landscape.png").stat().st_size > 0


def test_flex_evaluate_reaches_the_experts_at_full_size(testbed: Path, tmp_path: Path) -> None:
    tasks = manifest(testbed)["tasks"]
    path = bed_recipe(testbed, "tb-flex.yaml", "experts", 40)
    out = tmp_path / "flex"
    sizes = f"1,2,{len(tasks)}"
    result = run_cli("flex", path, "--sizes", sizes, "--evaluate", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["evaluation"]
    by_target = {r["target"]: r for r in scores["sizes"]}
    # at M× every task keeps its own expert: the experts' scores exactly
    assert by_target[float(len(tasks))]["tasks"] == pytest.approx(scores["experts"])
    # at 1× every task gets the one task-arithmetic merge
    merged = Scorer(load_recipe(path)).merge(load_recipe(path))
    assert by_target[1.0]["tasks"] == pytest.approx(merged.tasks)
    assert scores["gain_1x_2x"] == pytest.approx(by_target[2.0]["score"] - by_target[1.0]["score"])
    assert json.loads((out / "flex_scores.json").read_text())["sizes"] == scores["sizes"]
    assert (out / "flex_scores.png").stat().st_size > 0
