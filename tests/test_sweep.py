"""Sweeps, greedy soup, duration sweeps and loss landscapes against exhaustive evaluations
written here: dense merges scored example by example."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergecli import plan_merge
from mergecli.errors import RecipeError
from mergecli.evaluate import Scorer, plan_with_selection, score_recipe
from mergecli.recipe import recipe_from_dict
from mergecli.sweep.grid import parse_grid, parse_values
from tests.eval_zoo import STEPS, TASKS, build_zoo, direct_scores, load_classifier
from tests.helpers import load_state, run_cli, write_recipe

DATA = "data/{task}/validation.jsonl"


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("clf"))


def direct(root: Path, state: dict[str, torch.Tensor], tasks=TASKS) -> dict[str, tuple]:
    """(accuracy, loss) per task of the base architecture loaded with ``state``."""
    model = load_classifier(root / "base", state)
    return {
        t: direct_scores(model, root / "base", root / "data" / t / "validation.jsonl")
        for t in tasks
    }


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def test_parse_values() -> None:
    assert parse_values("0.1:0.5:0.1", "x") == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert parse_values("1:7:3", "x") == [1, 4, 7]
    assert parse_values("0.2,0.5,true,sum", "x") == [0.2, 0.5, True, "sum"]
    for bad in ("1:0:0.1", "a:b:c", "0.1,,0.2", "0:1:0"):
        with pytest.raises(RecipeError) as caught:
            parse_values(bad, "--grid x")
        assert caught.value.key == "--grid"


@pytest.mark.slow
def test_grid_sweep_picks_what_an_exhaustive_evaluation_picks(clf: Path, tmp_path: Path) -> None:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": f"runs/{t}/checkpoint-{s}", "name": t}
            for t, s in zip(TASKS, (40, 20, 30), strict=True)
        ],
        "parameters": {"lambda": 1.0},
        "evaluate": {"metric": "loss", "data": DATA},
    }
    path = write_recipe(clf, spec, "grid.yaml")
    out = tmp_path / "best"
    result = run_cli(
        "sweep", path, "--grid", "lambda=0.5:1.5:0.5", "--grid", "a.weight=0,1", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    # exhaustive: θ0 + λ (wa τa + τb + τc) for every point, scored directly
    base = load_state(clf / "base")
    experts = [load_state(clf / m["model"]) for m in spec["models"]]
    scores = {}
    for lam in (0.5, 1.0, 1.5):
        for wa in (0, 1):
            weights = (wa, 1, 1)
            state = {
                k: base[k]
                + lam * sum(w * (e[k] - base[k]) for w, e in zip(weights, experts, strict=True))
                for k in base
            }
            scores[(lam, wa)] = mean(loss for _, loss in direct(clf, state).values())
    best = min(scores, key=scores.get)
    assert (table["best"]["parameters"]["lambda"], table["best"]["parameters"]["a.weight"]) == best
    assert len(table["rows"]) == 6
    for row in table["rows"]:
        key = (row["parameters"]["lambda"], row["parameters"]["a.weight"])
        assert row["score"] == pytest.approx(scores[key], abs=1e-5)
    # the best merge is written, with the table beside it
    lam, wa = best
    merged = load_state(out)
    for k in base:
        expected = base[k] + lam * (
            wa * (experts[0][k] - base[k]) + experts[1][k] - base[k] + experts[2][k] - base[k]
        )
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=1e-5)
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[0] == "lambda,a.weight,a,b,c,score" and len(csv) == 7
    # early stop: with patience 1 the sweep ends at the first point that is not a new best
    first_worse = next(
        i
        for i in range(1, 6)
        if scores[list(scores)[i]] >= min(scores[p] for p in list(scores)[:i])
    )
    result = run_cli(
        "sweep",
        path,
        "--grid",
        "lambda=0.5:1.5:0.5",
        "--grid",
        "a.weight=0,1",
        "-o",
        tmp_path / "early",
        "--patience",
        "1",
        "--json",
    )
    early = json.loads(result.stdout)
    assert early["evaluated"] == first_worse + 1 and early["stopped_early"]


@pytest.mark.slow
def test_greedy_soup_picks_what_an_exhaustive_evaluation_picks(clf: Path, tmp_path: Path) -> None:
    ingredients = [
        ("a20", "a", 20),
        ("b20", "b", 20),
        ("c30", "c", 30),
        ("b30", "b", 30),
        ("a40", "a", 40),
    ]
    spec = {
        "merge_method": "greedy_soup",
        "base_model": "base",
        "models": [{"model": f"runs/{t}/checkpoint-{s}", "name": n} for n, t, s in ingredients],
        "evaluate": {
            "metric": "accuracy",
            "data": DATA,
            "tasks": {"a": {"expert": "a20"}, "b": {"expert": "b20"}, "c": {"expert": "c30"}},
        },
    }
    path = write_recipe(clf, spec, "greedy.yaml")
    result = run_cli("merge", path, "-o", tmp_path / "soup", "--json")
    assert result.exit_code == 0, result.output
    soup = json.loads(result.stdout)["greedy_soup"]
    # exhaustive: every ingredient and every candidate soup (uniform average), scored directly
    states = [load_state(clf / m["model"]) for m in spec["models"]]

    def score(indices: list[int]) -> float:
        avg = {k: sum(states[i][k] for i in indices) / len(indices) for k in states[0]}
        return mean(acc for acc, _ in direct(clf, avg).values())

    own = [score([i]) for i in range(len(states))]
    order = sorted(range(len(states)), key=lambda i: (-own[i], i))
    kept, current = [order[0]], own[order[0]]
    for i in order[1:]:
        candidate = score([*kept, i])
        if candidate > current + 1e-12:
            kept, current = [*kept, i], candidate
    assert soup["selected"] == [ingredients[i][0] for i in kept]
    assert 1 < len(kept) < len(ingredients)  # the zoo makes the choice non-trivial
    assert [s["expert"] for s in soup["steps"]] == [ingredients[i][0] for i in order]
    merged = load_state(tmp_path / "soup")
    for k in states[0]:
        expected = sum(states[i][k] for i in kept) / len(kept)
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=1e-5)
    # from Python: plan_merge refuses to average every expert; plan_with_selection selects
    recipe = recipe_from_dict(spec, clf)
    with pytest.raises(RecipeError, match="plan_with_selection") as caught:
        plan_merge(recipe)
    assert caught.value.key == "merge_method"
    plan, details = plan_with_selection(recipe)
    assert details["greedy_soup"] == soup
    assert [e.path for e in plan.experts] == [(clf / spec["models"][i]["model"]) for i in kept]


@pytest.mark.slow
def test_duration_sweep_by_tstar(clf: Path, tmp_path: Path) -> None:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"runs/{t}", "name": t} for t in TASKS],
        "parameters": {"lambda": 0.5},
        "evaluate": {"metric": "accuracy", "data": DATA},
    }
    path = write_recipe(clf, spec, "runs.yaml")
    out = tmp_path / "durations"
    result = run_cli(
        "sweep",
        path,
        "--over-checkpoints",
        "--methods",
        "task_arithmetic,linear",
        "--multiples",
        "0.5,1,2",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    base = load_state(clf / "base")
    tstar = {}
    for t in TASKS:
        accs = {}
        for s in STEPS:
            model = load_classifier(clf / "runs" / t / f"checkpoint-{s}")
            accs[s] = direct_scores(model, clf / "base", clf / "data" / t / "validation.jsonl")[0]
        tstar[t] = max(accs, key=lambda s, accs=accs: (accs[s], -s))
    assert sweep["tstar"] == tstar
    point = next(p for p in sweep["points"] if p["x"] == 1.0)
    assert point["steps"] == [tstar[t] for t in TASKS]
    experts = [load_state(clf / "runs" / t / f"checkpoint-{tstar[t]}") for t in TASKS]
    ta = {k: base[k] + 0.5 * sum(e[k] - base[k] for e in experts) for k in base}
    assert point["methods"]["task_arithmetic"]["score"] == pytest.approx(
        mean(a for a, _ in direct(clf, ta).values())
    )
    for p in sweep["points"]:
        nearest = [min(STEPS, key=lambda s, t=t: (abs(s - p["x"] * tstar[t]), s)) for t in TASKS]
        assert p["steps"] == nearest
    assert (out / "durations.png").stat().st_size > 0
    assert json.loads((out / "durations.json").read_text())["tstar"] == tstar


def test_duration_sweep_by_step_prints_a_table(clf: Path, tmp_path: Path) -> None:
    spec = {
        "merge_method": "linear",
        "models": [{"model": f"runs/{t}", "name": t} for t in TASKS[:2]],
        "evaluate": {"metric": "loss", "data": DATA, "tasks": ["a", "b"]},
    }
    path = write_recipe(clf, spec, "steps.yaml")
    result = run_cli("sweep", path, "--over-checkpoints", "--by", "step", "-o", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert "a@40, b@40" in result.stdout and "durations.png" in result.stdout


@pytest.mark.slow
def test_landscape_endpoints_and_midpoint(clf: Path, tmp_path: Path) -> None:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"runs/{t}/checkpoint-40", "name": t} for t in TASKS],
        "evaluate": {"metric": "accuracy", "data": DATA},
    }
    path = write_recipe(clf, spec, "land.yaml")
    out = tmp_path / "land"
    result = run_cli(
        "analyze", "landscape", path, "--models", "a,b", "--alphas", "0,0.5,1", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    land = json.loads(result.stdout)
    assert land["metric"] == "loss" and set(land["tasks"]) == {"a", "b"}
    a, b = (load_state(clf / "runs" / t / "checkpoint-40") for t in ("a", "b"))
    for alpha, index in ((0.0, 0), (0.5, 1), (1.0, 2)):
        state = {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}
        losses = {t: loss for t, (_, loss) in direct(clf, state, ("a", "b")).items()}
        for t in ("a", "b"):
            assert land["tasks"][t][index] == pytest.approx(losses[t], abs=1e-5)
    curve = land["mean"]
    assert land["barrier"] == pytest.approx(max(curve) - (curve[0] + curve[-1]) / 2)
    assert (out / "landscape.png").stat().st_size > 0
    # task-arithmetic path from the base to one expert: α = 1 is the expert itself
    result = run_cli(
        "analyze",
        "landscape",
        path,
        "--models",
        "c",
        "--path",
        "task_arithmetic",
        "--alphas",
        "0:1:0.5",
        "--json",
    )
    land = json.loads(result.stdout)
    c = load_state(clf / "runs" / "c" / "checkpoint-40")
    _, loss = direct(clf, c, ("c",))["c"]
    assert land["tasks"] == {
        "c": pytest.approx([land["tasks"]["c"][0], land["tasks"]["c"][1], loss], abs=1e-5)
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "lamda=0.1,0.2"], "has no parameter 'lamda' (did you mean 'lambda'?)"),
        (["--grid", "lambda"], "expected KEY=VALUES"),
        (["--grid", "zz.weight=1"], "no model is named 'zz'"),
        ([], "give --grid"),
        (["--grid", "lambda=1", "--over-checkpoints"], "not both"),
        (["--over-checkpoints"], "no expert names a training-run folder"),
    ],
)
def test_sweep_errors_are_one_line(
    clf: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"runs/{t}/checkpoint-10", "name": t} for t in TASKS],
        "evaluate": {"metric": "loss", "data": DATA},
    }
    path = write_recipe(clf, spec, "err.yaml")
    result = run_cli("sweep", path, *args, "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.strip().count("\n") == 0


def test_greedy_soup_needs_an_evaluate_section(clf: Path, tmp_path: Path) -> None:
    spec = {"merge_method": "greedy_soup", "models": [{"model": "runs/a/checkpoint-10"}]}
    result = run_cli("merge", write_recipe(clf, spec, "g.yaml"), "-o", tmp_path / "g")
    assert result.exit_code == 2 and "no 'evaluate:' section" in result.stderr
    assert not (tmp_path / "g").exists()


def test_artifact_methods_score_each_task_on_its_own_model(clf: Path) -> None:
    spec = recipe_from_dict(
        {
            "merge_method": "tall_masks",
            "base_model": "base",
            "models": [{"model": f"runs/{t}/checkpoint-20", "name": t} for t in TASKS],
            "evaluate": {"metric": "loss", "data": DATA},
        },
        clf,
    )
    scores = score_recipe(Scorer(spec), spec).tasks
    # dense TALL (METHODS.md): task t is θ0 + m_t ⊙ τ_MTL, m_t = |τt| > λ |τ_MTL − τt|
    from mergecli.methods import get_method

    lam = get_method("tall_masks").param("lambda").default
    base = load_state(clf / "base")
    experts = [load_state(clf / "runs" / t / "checkpoint-20") for t in TASKS]
    for t, task in enumerate(TASKS):
        state = {}
        for k in base:
            tvs = [e[k] - base[k] for e in experts]
            mtl = sum(tvs)
            mask = tvs[t].abs() > lam * (mtl - tvs[t]).abs()
            state[k] = base[k] + mask * mtl
        _, loss = direct(clf, state, (task,))[task]
        assert scores[task] == pytest.approx(loss, abs=1e-5)


def test_sweep_from_python_writes_the_best_merge_and_its_table(clf: Path, tmp_path: Path) -> None:
    from mergecli.sweep.run import sweep

    spec = recipe_from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": f"runs/{t}/checkpoint-20", "name": t} for t in TASKS],
            "evaluate": {"metric": "loss", "data": DATA},
        },
        clf,
    )
    scorer = Scorer(spec)
    table = sweep(spec, parse_grid(["lambda=0.2,1.0"], spec), scorer, tmp_path / "best")
    scores = [row["score"] for row in table["rows"]]
    assert table["best"] == table["rows"][scores.index(min(scores))]
    assert sorted(Path(f).name for f in table["files"]) == ["sweep.csv", "sweep.json"]
    best = recipe_from_dict(
        {**spec.model_dump(exclude={"folder"}), "parameters": table["best"]["parameters"]}, clf
    )
    assert scorer.folder(tmp_path / "best").score == pytest.approx(scorer.merge(best).score)


def test_landscape_recipe_measures_with_a_built_in_metric_or_the_command(clf: Path) -> None:
    from mergecli.sweep.landscape import landscape_recipe

    spec = {"merge_method": "linear", "models": [{"model": "runs/a/checkpoint-10"}]}
    metric = recipe_from_dict({**spec, "evaluate": {"metric": "accuracy", "data": DATA}}, clf)
    assert landscape_recipe(metric).evaluate.metric == "loss"
    assert landscape_recipe(metric, "perplexity").evaluate.metric == "perplexity"
    command = recipe_from_dict({**spec, "evaluate": {"command": "score {model}"}}, clf)
    assert landscape_recipe(command).evaluate == command.evaluate
    with pytest.raises(RecipeError) as caught:
        landscape_recipe(command, "loss")
    assert caught.value.key == "--metric"
    with pytest.raises(RecipeError) as caught:
        landscape_recipe(recipe_from_dict(spec, clf), source="r.yaml")
    assert caught.value.key == "evaluate" and str(caught.value).startswith("r.yaml: ")


def test_flex_sizes_scored_from_python(clf: Path, tmp_path: Path) -> None:
    from mergecli.flex import plan_flex, run_flex
    from mergecli.flex.report import result_summary
    from mergecli.sweep.sizes import score_flex

    spec = recipe_from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": f"runs/{t}/checkpoint-30", "name": t} for t in TASKS],
            "evaluate": {"metric": "loss", "data": DATA},
        },
        clf,
    )
    result = run_flex(plan_flex(spec, {"sizes": [1.0, 3.0]}), tmp_path / "flex")
    summary = result_summary(result)
    assert [s["target"] for s in summary["sizes"]] == [1.0, 3.0]
    assert all(Path(s["folder"]).is_dir() for s in summary["sizes"])
    scores = score_flex(spec, Scorer(spec), result)
    assert all(Path(f).is_file() for f in scores["files"])
    # at M× every task's model is its own expert
    top = scores["sizes"][-1]["tasks"]
    assert top == pytest.approx(scores["experts"])


def test_scoring_does_not_import_selection() -> None:
    """greedy soup builds on scoring, never the other way round (no import cycle)."""
    import ast

    import mergecli.evaluate.score as score

    tree = ast.parse(Path(score.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"mergecli.evaluate.greedy", "mergecli.evaluate.selection"}
