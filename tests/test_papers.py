"""The papers' protocols as commands, checked on the reduced testbed against computations that
do not use mergecli: merges by the dense formula, accuracy by the testbed's own code."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

from scripts.testbed import build as build_testbed
from scripts.testbed.data import read_jsonl
from scripts.testbed.model import accuracy, encode
from tests.helpers import run_cli, write_recipe

EXPERTS = 3


def manifest(testbed: Path) -> dict:
    return json.loads((testbed / "testbed.json").read_text())


def recipe(testbed: Path, name: str, folder: str, **extra: object) -> Path:
    """Task arithmetic over the first three experts (or runs); validation data for selection,
    test data for reporting."""
    tasks = manifest(testbed)["tasks"][:EXPERTS]
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"{folder}/{t}", "name": t} for t in tasks],
        "parameters": {"lambda": 0.3},
        "evaluate": {
            "metric": "accuracy",
            "data": "data/{task}/validation.jsonl",
            "test_data": "data/{task}/test.jsonl",
            "batch_size": 128,
        },
        **extra,
    }
    return write_recipe(testbed, spec, name)


@cache
def state(folder: Path) -> dict[str, torch.Tensor]:
    return BertForSequenceClassification.from_pretrained(folder).state_dict()


@cache
def held_out(testbed: Path, task: str, split: str):  # type: ignore[no-untyped-def]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(testbed / "base")
    return encode(tokenizer, read_jsonl(testbed / "data" / task / f"{split}.jsonl"))


def dense_score(testbed: Path, experts: list[Path], lam: float, split: str) -> float:
    """Mean accuracy over the experts' tasks of θ0 + λ Σ (θt − θ0), computed directly."""
    base = state(testbed / "base")
    merged = {k: v + lam * sum(state(e)[k] - v for e in experts) for k, v in base.items()}
    model = BertForSequenceClassification.from_pretrained(testbed / "base")
    model.load_state_dict(merged)
    tasks = manifest(testbed)["tasks"][:EXPERTS]
    return sum(accuracy(model, held_out(testbed, t, split)) for t in tasks) / len(tasks)


def test_grid_is_tuned_at_every_training_duration(testbed: Path, tmp_path: Path) -> None:
    """sweep --grid --over-checkpoints: λ chosen on validation at each duration, as an
    exhaustive dense evaluation chooses it, and the chosen merge reported on test data."""
    path = recipe(testbed, "papers-durations.yaml", "runs")
    lambdas = [0.2, 0.5, 0.8]
    result = run_cli(
        "sweep",
        path,
        "--over-checkpoints",
        "--grid",
        "lambda=0.2,0.5,0.8",
        "--multiples",
        "0.5,1",
        "-o",
        tmp_path / "d",
        "--json",
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert sweep["protocol"] == {"selected_on": "validation", "reported_on": "test"}
    assert len(sweep["points"]) == 2
    for point in sweep["points"]:
        experts = [Path(c) for c in point["checkpoints"]]
        validation = [dense_score(testbed, experts, lam, "validation") for lam in lambdas]
        entry = point["methods"]["task_arithmetic"]
        assert [g["score"] for g in entry["grid"]] == pytest.approx(validation)
        best = max(range(3), key=lambda i: (round(validation[i], 9), -i))
        assert entry["parameters"] == {"lambda": lambdas[best]}
        assert entry["test"]["score"] == pytest.approx(
            dense_score(testbed, experts, lambdas[best], "test")
        )
    saved = json.loads((tmp_path / "d" / "durations.json").read_text())
    assert saved["points"][0]["methods"] == sweep["points"][0]["methods"]


def test_grid_sweep_reports_the_validation_choice_on_test(testbed: Path, tmp_path: Path) -> None:
    path = recipe(testbed, "papers-grid.yaml", "experts")
    result = run_cli("sweep", path, "--grid", "lambda=0.2,0.5,0.8", "-o", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert "validation data" in result.stdout and "reported on test data" in result.stdout
    table = json.loads((tmp_path / "g" / "sweep.json").read_text())
    experts = [testbed / "experts" / t for t in manifest(testbed)["tasks"][:EXPERTS]]
    lam = table["best"]["parameters"]["lambda"]
    assert table["test"]["score"] == pytest.approx(dense_score(testbed, experts, lam, "test"))
    assert table["best"]["score"] == pytest.approx(dense_score(testbed, experts, lam, "validation"))


def test_greedy_soup_and_flex_report_test_scores(testbed: Path, tmp_path: Path) -> None:
    """The soup chosen on validation is reported on test; FlexMerge's sizes too."""
    path = recipe(testbed, "papers-soup.yaml", "experts", merge_method="greedy_soup", parameters={})
    result = run_cli("merge", path, "-o", tmp_path / "soup", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    chosen = [testbed / "experts" / n for n in summary["greedy_soup"]["selected"]]
    uniform = 1 / len(chosen)  # the soup is the uniform average: θ0 + (1/k) Σ τ
    assert summary["test"]["score"] == pytest.approx(dense_score(testbed, chosen, uniform, "test"))
    flex = recipe(testbed, "papers-flex.yaml", "experts")
    result = run_cli("flex", flex, "--sizes", f"1,{EXPERTS}", "--evaluate", "-o", tmp_path / "f")
    assert result.exit_code == 0, result.output
    assert "test data" in result.stdout
    scores = json.loads((tmp_path / "f" / "flex_scores.json").read_text())
    one = next(r for r in scores["sizes"] if r["target"] == 1.0)
    experts = [testbed / "experts" / t for t in manifest(testbed)["tasks"][:EXPERTS]]
    assert one["test"]["score"] == pytest.approx(dense_score(testbed, experts, 0.3, "test"))
    full = next(r for r in scores["sizes"] if r["target"] == EXPERTS)
    assert full["test"]["tasks"] == pytest.approx(scores["experts_test"])


def alg1(scores: dict[int, float], patience: int) -> int:
    """Early stopping as §5.2 of the undertraining paper states it (Alg. 1's plateau test, with
    a stop where Alg. 1 decays the rate): the best accuracy before the stop."""
    best_step, best, waited = None, -1.0, 0
    for step in sorted(scores):
        if scores[step] > best:
            best_step, best, waited = step, scores[step], 0
        else:
            waited += 1
        if waited >= patience:
            break
    assert best_step is not None
    return best_step


def test_tstar_is_the_minimum_validation_loss_and_early_stopping(
    testbed: Path, tmp_path: Path
) -> None:
    """--by tstar takes the builder's minimum-validation-loss step (not the accuracy optimum);
    --stop-patience merges the checkpoints Alg. 1 stops at."""
    path = recipe(testbed, "papers-tstar.yaml", "runs")
    out = tmp_path / "t"
    result = run_cli(
        "sweep", path, "--over-checkpoints", "--multiples", "1", "--stop-patience", "1",
        "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    runs = {t: r for t, r in manifest(testbed)["runs"].items() if t in sweep["experts"]}
    assert sweep["tstar"] == {t: r["tstar"] for t, r in runs.items()}
    for task, run in runs.items():
        losses = {int(k): v for k, v in sweep["validation_loss"][task].items()}
        assert losses == pytest.approx({int(k): v for k, v in run["validation_loss"].items()})
    stop = sweep["early_stop"]
    steps = [alg1({int(k): v for k, v in r["validation"].items()}, 1) for r in runs.values()]
    assert stop["steps"] == steps
    checkpoints = [
        testbed / "runs" / t / f"checkpoint-{s}" for t, s in zip(runs, steps, strict=True)
    ]
    assert stop["methods"]["task_arithmetic"]["score"] == pytest.approx(
        dense_score(testbed, checkpoints, 0.3, "validation")
    )
    assert stop["methods"]["task_arithmetic"]["test"]["score"] == pytest.approx(
        dense_score(testbed, checkpoints, 0.3, "test")
    )


def test_tstar_reads_the_trainers_eval_loss(testbed: Path, tmp_path: Path) -> None:
    """A run whose last checkpoint has a trainer_state.json gives T* from its eval_loss."""
    tasks = manifest(testbed)["tasks"][:EXPERTS]
    root = tmp_path / "bed"
    root.mkdir()
    for part in ("base", "data", "testbed.json"):
        (root / part).symlink_to(testbed / part)
    for task in tasks:
        shutil.copytree(testbed / "runs" / task, root / "runs" / task)
    run = root / "runs" / tasks[0]
    steps = sorted(int(p.name.split("-")[1]) for p in run.iterdir())
    losses = {s: 1.0 + (s == steps[0]) for s in steps}  # equal but the first: T* = steps[1]
    history = [{"step": s, "eval_loss": v, "epoch": 0.1} for s, v in losses.items()]
    history.insert(0, {"step": steps[0], "loss": 9.0})
    (run / f"checkpoint-{steps[-1]}" / "trainer_state.json").write_text(
        json.dumps({"log_history": history})
    )
    path = recipe(root, "r.yaml", "runs")
    result = run_cli(
        "sweep", path, "--over-checkpoints", "--multiples", "1", "-o", tmp_path / "o", "--json"
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert sweep["tstar"][tasks[0]] == steps[1]
    assert sweep["tstar_source"][tasks[0]] == "trainer_state.json"
    assert sweep["tstar"][tasks[1]] == manifest(testbed)["runs"][tasks[1]]["tstar"]


@pytest.fixture(scope="module")
def two_seeds(testbed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced testbed of seed 0 (the session's) and of seed 1, as ``seed{seed}/``."""
    root = tmp_path_factory.mktemp("seeds")
    (root / "seed0").symlink_to(testbed)
    build_testbed(root / "seed1", reduced=True, seed=1)
    return root


def seeds_recipe(root: Path, name: str) -> Path:
    tasks = manifest(root / "seed0")["tasks"][:EXPERTS]
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "seed{seed}/base",
        "models": [{"model": f"seed{{seed}}/runs/{t}", "name": t} for t in tasks],
        "parameters": {"lambda": 0.3},
        "evaluate": {
            "metric": "accuracy",
            "data": "seed{seed}/data/{task}/validation.jsonl",
            "test_data": "seed{seed}/data/{task}/test.jsonl",
            "batch_size": 128,
        },
    }
    return write_recipe(root, spec, name)


def test_duration_sweep_over_seeds_is_mean_and_std(two_seeds: Path, tmp_path: Path) -> None:
    path = seeds_recipe(two_seeds, "seeds.yaml")
    result = run_cli(
        "sweep", path, "--over-checkpoints", "--multiples", "1", "--seeds", "0,1",
        "-o", tmp_path / "s",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "±" in result.stdout and "seeds 0, 1" in result.stdout
    sweep = json.loads((tmp_path / "s" / "durations.json").read_text())
    tests = []
    for seed in (0, 1):
        bed = two_seeds / f"seed{seed}"
        runs = manifest(bed)["runs"]
        tasks = manifest(bed)["tasks"][:EXPERTS]
        at = [bed / "runs" / t / f"checkpoint-{runs[t]['tstar']}" for t in tasks]
        tests.append(dense_score(bed, at, 0.3, "test"))
    entry = sweep["points"][0]["methods"]["task_arithmetic"]
    spread = sweep["std"]["points"][0]["methods"]["task_arithmetic"]
    assert entry["test"]["score"] == pytest.approx(statistics.fmean(tests))
    assert spread["test"]["score"] == pytest.approx(statistics.stdev(tests))
    assert sweep["seeds"] == [0, 1] and len(sweep["per_seed"]) == 2


def test_interference_over_checkpoints_over_seeds(two_seeds: Path, tmp_path: Path) -> None:
    """Task-vector norms at each matched step: mean ± std of the direct ‖θt − θ0‖."""
    path = seeds_recipe(two_seeds, "seeds-int.yaml")
    result = run_cli(
        "analyze", "interference", path, "--over-checkpoints", "--seeds", "0,1",
        "--plot", tmp_path / "p", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    tasks = manifest(two_seeds / "seed0")["tasks"][:EXPERTS]
    for i, point in enumerate(sweep["points"]):
        step = int(point["step"])  # the mean over seeds of equal steps
        for t, task in enumerate(tasks):
            norms = []
            for seed in (0, 1):
                bed = two_seeds / f"seed{seed}"
                base = state(bed / "base")
                expert = state(bed / "runs" / task / f"checkpoint-{step}")
                norms.append(
                    math.sqrt(
                        sum(float(((expert[k] - v).double() ** 2).sum()) for k, v in base.items())
                    )
                )
            assert point["model"]["norm"][t] == pytest.approx(statistics.fmean(norms), rel=1e-5)
            spread = sweep["std"]["points"][i]["model"]["norm"][t]
            assert spread == pytest.approx(statistics.stdev(norms), rel=1e-4)
    assert (tmp_path / "p" / "checkpoints.png").stat().st_size > 0
