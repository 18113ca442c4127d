"""Barriers over expert pairs and checkpoints, the TIES α-path, merge and SWA gains and the
effective noise scale on the reduced testbed, against models built with torch here and scored
on every validation example."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from scripts.testbed.branches import train_branches
from tests.eval_zoo import examples, load_classifier
from tests.helpers import load_state, run_cli, write_recipe

pytestmark = pytest.mark.slow  # builds and trains the real testbed

State = dict[str, torch.Tensor]


def tasks_of(testbed: Path) -> list[str]:
    return json.loads((testbed / "testbed.json").read_text())["tasks"]


def scores(testbed: Path, state: State, tasks: list[str]) -> dict[str, tuple[float, float]]:
    """(accuracy, mean cross-entropy) per task of the testbed's model with ``state``, on every
    validation example (the testbed's texts all have 18 tokens: one batch, no padding)."""
    model = load_classifier(testbed / "base", state)
    tokenizer = AutoTokenizer.from_pretrained(testbed / "base")
    out = {}
    with torch.no_grad():
        for task in tasks:
            rows = examples(testbed / "data" / task / "validation.jsonl")
            batch = tokenizer([r["text"] for r in rows], return_tensors="pt")
            labels = torch.tensor([r["label"] for r in rows])
            logits = model(**batch).logits
            accuracy = float((logits.argmax(-1) == labels).float().mean())
            out[task] = (accuracy, float(F.cross_entropy(logits, labels)))
    return out


def mean_loss(testbed: Path, state: State, tasks: list[str]) -> float:
    losses = scores(testbed, state, tasks)
    return math.fsum(losses[t][1] for t in tasks) / len(tasks)


def average(states: list[State]) -> State:
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def both_barriers(curve: list[float], alphas: list[float]) -> tuple[float, float]:
    ends = max(curve) - (curve[0] + curve[-1]) / 2
    chord = max(
        v - ((1 - a) * curve[0] + a * curve[-1]) for v, a in zip(curve, alphas, strict=True)
    )
    return ends, chord


def recipe(testbed: Path, name: str, folder: str, tasks: list[str], **extra: object) -> Path:
    spec = {
        "merge_method": "linear",
        "base_model": "base",
        "models": [{"model": f"{folder}/{t}", "name": t} for t in tasks],
        "evaluate": {"metric": "accuracy", "data": "data/{task}/validation.jsonl"},
        **extra,
    }
    return write_recipe(testbed, spec, name)


def test_barriers_over_pairs_and_checkpoints(testbed: Path, tmp_path: Path) -> None:
    tasks = tasks_of(testbed)[:3]
    path = recipe(testbed, "tb-barriers.yaml", "runs", tasks)
    alphas = [0.0, 0.25, 1.0]
    out = tmp_path / "barriers"
    result = run_cli(
        "analyze", "barriers", path, "--over-checkpoints", "--by", "tstar",
        "--multiples", "0.5,1", "--alphas", "0,0.25,1", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["metric"] == "loss"
    # T*: the step of least validation loss, scored here at every checkpoint
    tstar = {}
    for task in tasks:
        runs = sorted((testbed / "runs" / task).iterdir(), key=lambda p: int(p.name[11:]))
        losses = {int(p.name[11:]): scores(testbed, load_state(p), [task])[task][1] for p in runs}
        tstar[task] = min(losses, key=lambda s: (losses[s], s))
    assert got["tstar"] == tstar
    assert [p["x"] for p in got["points"]] == [0.5, 1.0]
    point_means = {"barrier": [], "chord_barrier": []}
    for point in got["points"]:
        steps = dict(zip(tasks, point["steps"], strict=True))
        assert steps == {t: round(point["x"] * tstar[t]) for t in tasks}
        states = {t: load_state(testbed / "runs" / t / f"checkpoint-{steps[t]}") for t in tasks}
        expected = []
        for (a, b), pair in zip(itertools.combinations(tasks, 2), point["pairs"], strict=True):
            assert pair["models"] == [a, b]
            curve = [
                mean_loss(testbed, average_weighted(states[a], states[b], x), [a, b])
                for x in alphas
            ]
            assert pair["mean"] == pytest.approx(curve, abs=1e-5)
            ends, chord = both_barriers(curve, alphas)
            assert pair["barrier"] == pytest.approx(ends, abs=1e-5)
            assert pair["chord_barrier"] == pytest.approx(chord, abs=1e-5)
            expected.append((ends, chord))
        assert point["barrier"] == pytest.approx(sum(e for e, _ in expected) / 3, abs=1e-5)
        assert point["chord_barrier"] == pytest.approx(sum(c for _, c in expected) / 3, abs=1e-5)
        point_means["barrier"].append(point["barrier"])
        point_means["chord_barrier"].append(point["chord_barrier"])
    for kind, values in point_means.items():
        assert got[kind] == pytest.approx(sum(values) / len(values))
    assert (out / "barriers.png").stat().st_size > 0


def average_weighted(a: State, b: State, alpha: float) -> State:
    return {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}


def ties_vector(base: State, experts: list[State], density: float) -> State:
    """TIES by hand, per tensor: keep each task vector's k = ⌈density·n⌉ largest magnitudes
    (ties with the k-th kept), elect the sign of their sum (+ where it is 0), average the kept
    entries of that sign."""
    merged = {}
    for key, theta0 in base.items():
        kept = []
        for expert in experts:
            tau = expert[key] - theta0
            k = math.ceil(density * tau.numel())
            kth = tau.abs().flatten().sort(descending=True).values[k - 1]
            kept.append(torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau)))
        total = sum(kept)
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [(t != 0) & (torch.sign(t) == sign) for t in kept]
        count = sum(a.float() for a in agree)
        summed = sum(
            torch.where(a, t, torch.zeros_like(t)) for a, t in zip(agree, kept, strict=True)
        )
        merged[key] = torch.where(count > 0, summed / count.clamp(min=1), torch.zeros_like(total))
    return merged


def test_ties_alpha_path(testbed: Path, tmp_path: Path) -> None:
    tasks = tasks_of(testbed)[:2]
    path = recipe(
        testbed, "tb-ties.yaml", "experts", tasks,
        merge_method="ties", parameters={"density": 0.5, "scope": "tensor"},
    )  # fmt: skip
    out = tmp_path / "ties"
    result = run_cli(
        "analyze", "landscape", path, "--models", ",".join(tasks), "--path", "ties",
        "--alphas", "0,0.5,1", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["path_formula"] == "θ(α) = θ0 + α·τ_TIES"
    base = load_state(testbed / "base")
    tau = ties_vector(base, [load_state(testbed / "experts" / t) for t in tasks], 0.5)
    alphas = [0.0, 0.5, 1.0]
    for task in tasks:
        curve = [scores(testbed, {k: base[k] + a * tau[k] for k in base}, [task])[task][1]
                 for a in alphas]  # fmt: skip
        assert got["tasks"][task] == pytest.approx(curve, abs=1e-4)
    curve = got["mean"]
    ends, chord = both_barriers(curve, alphas)
    assert got["barrier"] == pytest.approx(ends) and got["chord_barrier"] == pytest.approx(chord)
    assert (out / "landscape.png").stat().st_size > 0


def test_merge_and_swa_gains_against_noise(testbed: Path, tmp_path: Path) -> None:
    tasks = tasks_of(testbed)
    settings = {"first": tasks[:2], "second": tasks[2:4]}
    paths = [recipe(testbed, f"{name}.yaml", "runs", ts) for name, ts in settings.items()]
    out = tmp_path / "gains"
    result = run_cli(
        "analyze", "gains", *paths, "--swa", "2", "--metric", "loss", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [r["setting"] for r in got["settings"]] == ["first", "second"]
    for row, pair in zip(got["settings"], settings.values(), strict=True):
        runs = [
            sorted((testbed / "runs" / t).iterdir(), key=lambda p: int(p.name[11:])) for t in pair
        ]
        last = [load_state(r[-1]) for r in runs]
        merged = scores(testbed, average(last), pair)
        experts = [scores(testbed, s, pair) for s in last]
        f_merge = sum(merged[t][1] for t in pair) / 2
        f_experts = [sum(e[t][1] for t in pair) / 2 for e in experts]
        assert row["merged"]["score"] == pytest.approx(f_merge, abs=1e-5)
        assert row["merge_gain"] == pytest.approx(f_merge - sum(f_experts) / 2, abs=1e-5)
        normalised = sum(merged[t][1] / e[t][1] for t, e in zip(pair, experts, strict=True)) / 2
        assert row["normalized"] == pytest.approx(normalised, abs=1e-5)
        swa = [average([load_state(c) for c in r[-2:]]) for r in runs]
        f_swa = [mean_loss(testbed, s, pair) for s in swa]
        f_swa_merge = mean_loss(testbed, average(swa), pair)
        assert row["swa"]["gain"] == pytest.approx(f_swa_merge - sum(f_swa) / 2, abs=1e-5)
        # the testbed fine-tunes with AdamW, η = 2·10⁻³, B = 64, β1 = 0.9
        assert row["noise_scale"] == pytest.approx(2e-3 / (64 * (1 - 0.9)))
    assert (out / "gains.png").stat().st_size > 0
    assert json.loads((out / "gains.json").read_text())["settings"][0]["setting"] == "first"


def test_gains_names_the_run_without_metadata(testbed: Path, tmp_path: Path) -> None:
    first, second = tasks_of(testbed)[:2]
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in (testbed / "experts" / first).iterdir():
        if file.name != "training_args.json":
            (bare / file.name).write_bytes(file.read_bytes())
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(bare), "name": first},
            {"model": str(testbed / "experts" / second), "name": second},
        ],
        "evaluate": {"metric": "loss", "data": str(testbed / "data/{task}/validation.jsonl")},
    }
    path = write_recipe(tmp_path, spec, "bare.yaml")
    result = run_cli("analyze", "gains", path)
    assert result.exit_code == 2
    assert f"{first} ({bare})" in result.stderr and "no learning_rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("analyze", "gains", path, "--lr", "1e-3", "--batch-size", "8", "--json")
    assert result.exit_code == 2 and "no momentum" in result.stderr


def test_branches_record_their_noise_scale_and_gains_reads_it(
    testbed: Path, tmp_path: Path
) -> None:
    task = tasks_of(testbed)[0]
    settings = [(4e-3, 32), (1e-3, 16)]  # S̃ = 1.25·10⁻³ and 6.25·10⁻⁴
    paths = [train_branches(testbed, task, lr, b, tmp_path / "branches") for lr, b in settings]
    ends = []
    for (lr, b), path in zip(settings, paths, strict=True):
        runs = [path.with_suffix("") / "runs" / branch for branch in ("a", "b")]
        last = [max(r.iterdir(), key=lambda p: int(p.name[11:])) for r in runs]
        for folder in [path.with_suffix("") / "shared", *last]:
            args = json.loads((folder / "training_args.json").read_text())
            assert (args["learning_rate"], args["per_device_train_batch_size"]) == (lr, b)
        states = [load_state(c) for c in last]
        assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
        ends.append(states)
    result = run_cli("analyze", "gains", *paths, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["settings"]
    assert [r["setting"] for r in rows] == [p.stem for p in reversed(paths)]  # sorted by S̃
    for row, (lr, b), states in zip(rows, reversed(settings), reversed(ends), strict=True):
        assert row["noise_scale"] == pytest.approx(lr / (b * (1 - 0.9)), rel=1e-12)
        merged = scores(testbed, average(states), [task])[task][0]
        experts = [scores(testbed, s, [task])[task][0] for s in states]
        assert row["merged"]["score"] == pytest.approx(merged, abs=1e-6)
        assert row["merge_gain"] == pytest.approx(merged - sum(experts) / 2, abs=1e-6)
