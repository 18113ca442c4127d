"""Temporal merging evaluated over time (TIME §3, App. B–D): recency weights and task vectors
against θ_{t−1} against hand formulas, and A_KA / A_ZS per step and (init, deploy) pair on the
reduced testbed against models built and scored by hand."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertForSequenceClassification

from mergecli.errors import EvaluationError, RecipeError
from mergecli.recipe import load_recipe
from mergecli.temporal import (
    PAIRS,
    TrainRequest,
    add_expert,
    command_trainer,
    evaluate_over_time,
    init_state,
    recency_weights,
)
from tests.helpers import load_state, run_cli, write_recipe
from tests.test_temporal import assert_same, dense, dense_ties

State = dict[str, torch.Tensor]


def test_recency_weights_equal_the_hand_formulas() -> None:
    """g(i) = ln(1 + i), i², 2^i, i³ over the experts i = 1..3, normalised; reversed."""
    hand = {
        "log": [math.log(2), math.log(3), math.log(4)],
        "quadratic": [1, 4, 9],
        "exponential": [2, 4, 8],
        "cubic": [1, 8, 27],
    }
    for scheme, raw in hand.items():
        total = sum(raw)
        assert recency_weights(scheme, 3) == pytest.approx([r / total for r in raw], abs=1e-15)
        assert recency_weights(scheme, 3, reverse=True) == pytest.approx(
            [r / total for r in reversed(raw)], abs=1e-15
        )
    assert recency_weights("cubic", 1) == [1.0]
    assert recency_weights("uniform", 4) is None


@pytest.mark.parametrize(
    ("method", "params", "scheme", "reverse"),
    [
        ("linear", {}, "quadratic", False),
        ("task_arithmetic", {"lambda": 0.8}, "log", True),
    ],
)
def test_deploy_all_with_recency_weights(
    zoo: Path, tmp_path: Path, method: str, params: dict, scheme: str, reverse: bool
) -> None:
    state = tmp_path / "state"
    settings = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "parameters": params,
        "temporal": {
            "init": "base",
            "deploy": "all",
            "recency": scheme,
            "recency_reversed": reverse,
        },
    }
    init_state(state, settings)
    base = dense(zoo / "base")
    seq = ["math", "code", "chat"]
    g = {"quadratic": lambda i: i * i, "log": lambda i: math.log(1 + i)}[scheme]
    for t, name in enumerate(seq, 1):
        add_expert(state, zoo / name)
        raw = [g(i) for i in range(1, t + 1)]
        weights = [r / sum(raw) for r in (reversed(raw) if reverse else raw)]
        experts = [dense(zoo / n) for n in seq[:t]]
        if method == "linear":
            want = {k: sum(w * e[k] for w, e in zip(weights, experts, strict=True)) for k in base}
        else:
            want = {
                k: b + 0.8 * sum(w * (e[k] - b) for w, e in zip(weights, experts, strict=True))
                for k, b in base.items()
            }
        assert_same(dense(state / "deploy"), want)


def test_recency_needs_a_weighted_method(zoo: Path, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "magmax",
        "base_model": str(zoo / "base"),
        "temporal": {"init": "base", "deploy": "all", "recency": "cubic"},
    }
    with pytest.raises(RecipeError, match=r"temporal\.recency") as info:
        init_state(tmp_path / "s", recipe)
    assert getattr(info.value, "key", None) == "temporal.recency"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_ema_task_vectors_against_the_previous_ema(zoo: Path, tmp_path: Path, method: str) -> None:
    """App. B: δ = θt − θ_{t−1}. With θ_{t−1} = EMA_{t−1}, task arithmetic gives
    EMA_t = EMA_{t−1} + λ·w·(θt − EMA_{t−1}); TIES (disjoint mean, λ = 1) EMA_{t−1} plus the
    trimmed δ, since the EMA's own task vector is zero."""
    w, lam, density = 0.3, 0.8, 0.3
    params = {"lambda": lam} if method == "task_arithmetic" else {"density": density}
    state = tmp_path / "state"
    settings = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "parameters": params,
        "temporal": {"ema_weight": w, "task_vectors": "previous"},
    }
    init_state(state, settings)
    ema = dense(zoo / "base")
    for name in ("math", "code", "chat"):
        add_expert(state, zoo / name)
        expert = dense(zoo / name)
        if method == "task_arithmetic":
            ema = {k: e + lam * w * (expert[k] - e) for k, e in ema.items()}
        else:
            ema = dense_ties(ema, [ema, expert], [1 - w, w], density)
        assert_same(dense(state / "deploy"), ema)


def test_evaluate_refuses_trained_pairs_without_a_train_command(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [{"model": "a"}],
            "temporal": {},
            "evaluate": {"metric": "accuracy", "data": "d.jsonl"},
        },
    )
    result = run_cli("temporal", "evaluate", path, "-o", tmp_path / "o", "--pairs", "ema/ema")
    assert result.exit_code == 2
    assert "temporal.train" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("temporal", "evaluate", path, "-o", tmp_path / "o", "--pairs", "ema-ema")
    assert result.exit_code == 2 and "--pairs 'ema-ema'" in result.stderr


def test_train_command_fills_the_template_and_fails_loudly(zoo: Path, tmp_path: Path) -> None:
    script = "import shutil, sys; shutil.copytree(*sys.argv[1:])"
    copy = f"{sys.executable} -c '{script}' {{init}} {{output}}"
    request = TrainRequest(2, "code", zoo / "base", tmp_path / "experts" / "02-code", zoo / "code")
    out = command_trainer(copy)(request)
    assert out == request.output and load_state(out).keys() == load_state(zoo / "base").keys()
    fail = f"{sys.executable} -c 'import sys; sys.exit(sys.argv[1])' {{task}}-{{step}}"
    with pytest.raises(EvaluationError, match=r"step 2, code\): exit status 1: code-2$"):
        command_trainer(fail)(request)
    empty = f"{sys.executable} -c 'import sys' {{output}}"
    with pytest.raises(EvaluationError, match="wrote no safetensors"):
        command_trainer(empty)(TrainRequest(1, "x", zoo / "base", tmp_path / "none", zoo / "code"))


# ---- on the reduced testbed -------------------------------------------------------------

SEQUENCE = ("rotate90", "mirror", "invert")
HELD_OUT = ("rotate180", "transpose")
W = 0.5
LIMIT = 40


def add_task_vector(base: State, init: State, expert: State) -> State:
    """The test's stand-in for training: init + (the testbed expert − θ0)."""
    return {k: init[k] + expert[k] - base[k] for k in base}


def write_model(state: State, like: Path, folder: Path) -> Path:
    """A checkpoint folder: ``state`` with the config and tokenizer of ``like``."""
    folder.mkdir(parents=True)
    for item in like.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy(item, folder / item.name)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


class HandScorer:
    """Argmax accuracy on the first LIMIT test examples of each task, with transformers
    directly (one model and one tokenised batch per task, reused)."""

    def __init__(self, testbed: Path, tasks: tuple[str, ...]) -> None:
        base = testbed / "base"
        self.model = BertForSequenceClassification.from_pretrained(base).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.data = {}
        for task in tasks:
            lines = (testbed / "data" / task / "test.jsonl").read_text().splitlines()[:LIMIT]
            rows = [json.loads(line) for line in lines]
            batch = tokenizer([r["text"] for r in rows], return_tensors="pt")
            self.data[task] = (batch, torch.tensor([r["label"] for r in rows]))

    @torch.no_grad()
    def __call__(self, state: State) -> dict[str, float]:
        self.model.load_state_dict(state)
        return {
            task: int((self.model(**batch).logits.argmax(-1) == labels).sum()) / len(labels)
            for task, (batch, labels) in self.data.items()
        }


def hand_trajectories(base: State, experts: list[State]) -> dict[tuple[str, str], list[State]]:
    """Every pair's deploy model at steps 1..T with linear merging, by the TIME formulas."""
    out: dict[tuple[str, str], list[State]] = {}
    for init in ("base", "latest", "ema"):
        start, ema, trained = base, base, []
        emas = []
        for expert in experts:
            model = add_task_vector(base, start, expert)
            trained.append(model)
            ema = {k: (1 - W) * ema[k] + W * model[k] for k in base}
            emas.append(ema)
            start = {"base": base, "latest": model, "ema": ema}[init]
        for deploy in ("latest", "ema", "all"):
            if (init, deploy) == ("base", "latest"):
                continue
            out[init, deploy] = [
                {
                    "latest": trained[t],
                    "ema": emas[t],
                    "all": {k: sum(m[k] for m in trained[: t + 1]) / (t + 1) for k in base},
                }[deploy]
                for t in range(len(experts))
            ]
    return out


@pytest.mark.slow
def test_every_pair_over_time_equals_hand_models_scored_by_hand(
    testbed: Path, tmp_path: Path
) -> None:
    spec = {
        "merge_method": "linear",
        "base_model": "base",
        "models": [{"model": f"experts/{t}", "name": t} for t in SEQUENCE],
        "temporal": {"ema_weight": W},
        "evaluate": {
            "metric": "accuracy",
            "data": "data/{task}/validation.jsonl",
            "test_data": "data/{task}/test.jsonl",
            "tasks": [*SEQUENCE, *HELD_OUT],
            "limit": LIMIT,
            "batch_size": 64,
        },
    }
    recipe = load_recipe(write_recipe(testbed, spec, "tb-time.yaml"))
    base = load_state(testbed / "base")
    experts = [load_state(testbed / "experts" / t) for t in SEQUENCE]
    calls: list[tuple[int, str]] = []

    def trainer(request: TrainRequest) -> Path:
        calls.append((request.step, request.task))
        expert = experts[request.step - 1]
        return write_model(
            add_task_vector(base, load_state(request.init), expert),
            testbed / "base",
            request.output,
        )

    result = evaluate_over_time(recipe, tmp_path / "study", device="cpu", trainer=trainer)
    assert calls == [(t, name) for _ in range(3) for t, name in enumerate(SEQUENCE, 1)]
    assert result["pairs"] == [f"{i}/{d}" for i, d in PAIRS] and len(PAIRS) == 8
    assert result["adaptation_tasks"] == {t: i for i, t in enumerate(SEQUENCE, 1)}
    assert result["held_out_tasks"] == list(HELD_OUT) and result["reported_on"] == "test"

    scores = HandScorer(testbed, (*SEQUENCE, *HELD_OUT))

    def check(row: dict, want: dict[str, float], step: int) -> None:
        assert row["tasks"] == pytest.approx(want, abs=1e-12)
        ka = sum(want[t] for t in SEQUENCE) / 3
        zs = sum(want[t] for t in HELD_OUT) / 2
        assert row["ka"] == pytest.approx(ka, abs=1e-12)
        assert row["zs"] == pytest.approx(zs, abs=1e-12)
        assert row["geo"] == pytest.approx(math.sqrt(ka * zs), abs=1e-12)
        known = [want[t] for t in SEQUENCE[:step]]
        assert row["known"] == (pytest.approx(sum(known) / len(known)) if known else None)

    check(result["base"], scores(base), 0)
    rows = {(r["init"], r["deploy"], r["step"]): r for r in result["rows"]}
    assert len(rows) == 8 * 3
    for (init, deploy), models in hand_trajectories(base, experts).items():
        for step, model in enumerate(models, 1):
            check(rows[init, deploy, step], scores(model), step)
    assert (tmp_path / "study" / "temporal_eval.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "study" / "temporal_eval.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))

    cli = run_cli(
        "temporal", "evaluate", testbed / "tb-time.yaml", "-o", tmp_path / "cli",
        "--pairs", "base/all", "--json",
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    library = [r for r in result["rows"] if (r["init"], r["deploy"]) == ("base", "all")]
    for got, want in zip(json.loads(cli.stdout)["rows"], library, strict=True):
        assert got["tasks"] == pytest.approx(want["tasks"], abs=1e-12)
