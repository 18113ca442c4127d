"""`analyze forgetting` and `analyze diwa` on the reduced testbed, against per-example outputs
computed here directly with transformers (one example at a time, no padding) and the papers'
formulas written out with numpy loops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertForSequenceClassification

from mergecli.evaluate import Scorer
from mergecli.recipe import load_recipe
from tests.helpers import load_state, run_cli, write_recipe

pytestmark = pytest.mark.slow  # builds and trains the real testbed

LAMBDA = 0.3
LIMIT = 40
TASKS = 3


def tasks_of(testbed: Path) -> list[str]:
    return json.loads((testbed / "testbed.json").read_text())["tasks"][:TASKS]


def direct_probs(testbed: Path, state: dict[str, torch.Tensor], task: str) -> np.ndarray:
    """Softmax of the classifier with these weights on the task's first LIMIT validation
    examples, one example at a time."""
    model = BertForSequenceClassification.from_pretrained(testbed / "base").float().eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    tokenizer = AutoTokenizer.from_pretrained(testbed / "base")
    lines = (testbed / "data" / task / "validation.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines][:LIMIT]
    out = []
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
            out.append(torch.softmax(logits.double(), -1).numpy())
    return np.array(out)


def labels_of(testbed: Path, task: str) -> np.ndarray:
    lines = (testbed / "data" / task / "validation.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["label"] for line in lines][:LIMIT])


def margin(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p_y − max_{c≠y} p_c, example by example."""
    return np.array(
        [p[i, y[i]] - max(p[i, c] for c in range(10) if c != y[i]) for i in range(len(y))]
    )


def task_arithmetic(base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ (θt − θ0), dense."""
    theta0 = load_state(base)
    states = [load_state(e) for e in experts]
    return {k: v + LAMBDA * sum(s[k] - v for s in states) for k, v in theta0.items()}


def recipe(folder: Path, testbed: Path, models: list[str], base: str) -> Path:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": m, "name": t} for m, t in zip(models, tasks_of(testbed), strict=True)],
        "parameters": {"lambda": LAMBDA},
        "evaluate": {
            "metric": "accuracy",
            "data": str(testbed / "data" / "{task}" / "validation.jsonl"),
            "limit": LIMIT,
            "batch_size": 16,
        },
    }
    return write_recipe(folder, spec)


def test_forgetting_matches_a_direct_computation(testbed: Path, tmp_path: Path) -> None:
    tasks = tasks_of(testbed)
    experts = [testbed / "experts" / t for t in tasks]
    path = recipe(tmp_path, testbed, [str(e) for e in experts], str(testbed / "base"))
    early = [str(testbed / "runs" / "{task}" / f"checkpoint-{s}") for s in (15, 30)]
    bins = 4
    result = run_cli(
        "analyze", "forgetting", path, "--early", early[0], "--early", early[1],
        "--compare", early[1], "--bins", bins, "--plot", tmp_path / "plots", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    merged = task_arithmetic(testbed / "base", experts)
    shares: dict[str, list[float]] = {"forgotten_share": [], "delta_loss": [], "shift": []}
    for task, expert in zip(tasks, experts, strict=True):
        y = labels_of(testbed, task)
        n = len(y)
        onehot = np.eye(10)[y]
        p_expert = direct_probs(testbed, load_state(expert), task)
        p_merged = direct_probs(testbed, merged, task)
        runs = [
            direct_probs(testbed, load_state(testbed / "runs" / task / f"checkpoint-{s}"), task)
            for s in (15, 30)
        ]
        p_early = runs[1]
        el2n = np.mean([np.sqrt(((p - onehot) ** 2).sum(1)) for p in runs], axis=0)
        order = np.lexsort((np.arange(n), el2n))
        bin_of = np.empty(n, dtype=int)
        bin_of[order] = np.arange(n) * bins // n + 1
        forgotten = (p_expert.argmax(1) == y) & (p_merged.argmax(1) != y)
        mine = got["tasks"][task]
        assert mine["per_example"]["el2n"] == pytest.approx(el2n, abs=1e-6)
        assert mine["per_example"]["bin"] == bin_of.tolist()
        assert mine["per_example"]["forgotten"] == np.flatnonzero(forgotten).tolist()
        assert mine["accuracy"]["merged"] == pytest.approx((p_merged.argmax(1) == y).mean())

        loss_e = -np.log(p_expert[np.arange(n), y])
        loss_c = -np.log(p_early[np.arange(n), y])
        for row in mine["per_bin"]:
            b = bin_of == row["bin"]
            right = (p_expert.argmax(1) == y) & b
            assert row["forgotten"] == int((forgotten & b).sum())
            assert row["forgotten_share"] == pytest.approx((forgotten & b).sum() / forgotten.sum())
            assert row["forgotten_rate"] == pytest.approx((forgotten & b).sum() / right.sum())
            assert row["loss_share"] == pytest.approx(loss_e[b].sum() / loss_e.sum(), rel=1e-5)
            dm = (margin(p_expert, y) - margin(p_early, y))[b].mean()
            assert row["delta_margin"] == pytest.approx(dm, abs=1e-5)
            assert row["delta_loss"] == pytest.approx((loss_c - loss_e)[b].mean(), abs=1e-4)
            shift = np.abs(p_expert - p_early).sum(1)[b].mean()
            assert row["shift"] == pytest.approx(shift, abs=1e-5)
        shares["forgotten_share"].append(
            [(forgotten & (bin_of == b)).sum() / forgotten.sum() for b in range(1, bins + 1)]
        )
        shares["delta_loss"].append(
            [(loss_c - loss_e)[bin_of == b].mean() for b in range(1, bins + 1)]
        )
        shares["shift"].append(
            [np.abs(p_expert - p_early).sum(1)[bin_of == b].mean() for b in range(1, bins + 1)]
        )
    for field, per_task in shares.items():
        means = np.mean(per_task, axis=0)
        assert [r[field] for r in got["mean"]["per_bin"]] == pytest.approx(means, abs=1e-4)
    assert got["mean"]["hardest_bins"] == 2  # ⌈0.3 · 4⌉
    assert got["mean"]["hardest_share"] == pytest.approx(
        np.mean(
            [s[-1] + s[-2] for s in shares["forgotten_share"]]  # the two hardest bins
        )
    )
    assert {Path(p).name for p in got["plots"]} == {"forgetting.png", "memorisation.png"}
    # the built-in accuracy is unchanged and agrees with the per-example predictions
    scorer = Scorer(load_recipe(path))
    for task, expert in zip(tasks, experts, strict=True):
        accuracy = scorer.model(expert).tasks[task]
        y = labels_of(testbed, task)
        assert accuracy == pytest.approx(got["tasks"][task]["accuracy"]["expert"])
        assert accuracy == pytest.approx(
            (direct_probs(testbed, load_state(expert), task).argmax(1) == y).mean()
        )


def test_diwa_decomposition_matches_a_direct_computation(testbed: Path, tmp_path: Path) -> None:
    """Two runs: the experts, and each run's checkpoint at step 45 (folders seed0/, seed1/)."""
    tasks = tasks_of(testbed)
    for seed, where in enumerate(("experts/{t}", "runs/{t}/checkpoint-45")):
        (tmp_path / f"seed{seed}").mkdir()
        for t in tasks:
            (tmp_path / f"seed{seed}" / t).symlink_to(testbed / where.format(t=t))
    path = recipe(tmp_path, testbed, [f"seed{{seed}}/{t}" for t in tasks], str(testbed / "base"))
    result = run_cli("analyze", "diwa", path, "--seeds", "0,1", "--plot", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    members = [[tmp_path / f"seed{r}" / t for t in tasks] for r in range(2)]
    merges = [task_arithmetic(testbed / "base", run) for run in members]
    m, runs = len(tasks), 2
    expected: dict[str, list[float]] = {}
    for task in tasks:
        y = np.eye(10)[labels_of(testbed, task)]
        p = [[direct_probs(testbed, load_state(f), task) for f in run] for run in members]
        mu = [sum(p[r][i] for r in range(runs)) / runs for i in range(m)]
        mean_mu = sum(mu) / m
        bias2 = ((mean_mu - y) ** 2).sum(1)
        var = sum(((p[r][i] - mu[i]) ** 2).sum(1) for r in range(runs) for i in range(m))
        var = var / (runs * m)
        cov = sum(
            ((p[r][i] - mu[i]) * (p[r][j] - mu[j])).sum(1)
            for r in range(runs)
            for i in range(m)
            for j in range(m)
            if i != j
        ) / (runs * m * (m - 1))
        ensemble = sum(((sum(p[r]) / m - y) ** 2).sum(1) for r in range(runs)) / runs
        merged = sum(
            ((direct_probs(testbed, merges[r], task) - y) ** 2).sum(1) for r in range(runs)
        )
        row = got["tasks"][task]
        values = [bias2.mean(), var.mean(), cov.mean(), ensemble.mean(), merged.mean() / runs]
        names = ("bias2", "variance", "covariance", "ensemble", "merged")
        for name, value in zip(names, values, strict=True):
            assert row[name] == pytest.approx(value, abs=1e-6), (task, name)
            expected.setdefault(name, []).append(value)
        # the decomposition is exact: ensemble = bias² + var/M + (1 − 1/M) cov
        assert row["ensemble"] == pytest.approx(
            row["bias2"] + row["variance"] / m + (1 - 1 / m) * row["covariance"], abs=1e-9
        )
    for name, values in expected.items():
        assert got["mean"][name] == pytest.approx(np.mean(values), abs=1e-6)
    assert got["mean"]["variance"] > 0 and got["mean"]["merged"] > got["mean"]["ensemble"]
    assert (tmp_path / "p" / "diwa.png").stat().st_size > 0


def test_per_example_analyses_refuse_bad_input(testbed: Path, tmp_path: Path) -> None:
    tasks = tasks_of(testbed)
    experts = [str(testbed / "experts" / t) for t in tasks]
    path = recipe(tmp_path, testbed, experts, str(testbed / "base"))
    missing = run_cli("analyze", "forgetting", path, "--early", "nowhere/{task}")
    assert missing.exit_code == 2 and "--early nowhere/{task}" in missing.stderr
    early = str(testbed / "runs" / "{task}" / "checkpoint-15")
    too_many = run_cli("analyze", "forgetting", path, "--early", early, "--bins", LIMIT + 1)
    assert too_many.exit_code == 2 and "fewer than the 41 bins" in too_many.stderr
    spec = yaml.safe_load(path.read_text())
    spec["evaluate"]["data"] = str(tmp_path / "seed{seed}" / "{task}.jsonl")
    for seed in (0, 1):
        (tmp_path / f"seed{seed}").mkdir()
        for t in tasks:
            target = tmp_path / f"seed{seed}" / f"{t}.jsonl"
            target.symlink_to(testbed / "data" / t / "validation.jsonl")
    seeded = write_recipe(tmp_path, spec, "seeded.yaml")
    differs = run_cli("analyze", "diwa", seeded, "--seeds", "0,1")
    assert differs.exit_code == 2 and "same examples" in differs.stderr
    for result in (missing, too_many, differs):
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
