"""Bias–variance–covariance decomposition of a merge's error (DiWA, Rame et al. 2022, Prop. 2;
training-duration §5.1).

DiWA writes the expected error of a weight average of M members as that of their functional
ensemble, E[(f̄ − y)²] = bias² + var/M + (1 − 1/M)·cov, plus a locality term O(Δ²) by which
the weight average differs from the ensemble, the expectations taken over the members' training
randomness. The training-duration paper applies it to merged experts without saying how the
expectations are estimated; here they are means over the runs given (a recipe with ``{seed}``
in its model paths, run once per seed; members = the recipe's M experts), per example x with
one-hot label y and p_{r,i} the softmax of member i in run r (squared error on probability
vectors, the Brier score):

- μ_i = mean_r p_{r,i};  bias² = ‖mean_i μ_i − y‖²;
- var = mean_i mean_r ‖p_{r,i} − μ_i‖²;
- cov = mean_r mean_{i≠j} ⟨p_{r,i} − μ_i, p_{r,j} − μ_j⟩;
- ensemble = mean_r ‖mean_i p_{r,i} − y‖² = bias² + var/M + (1 − 1/M)·cov exactly;
- merged = mean_r ‖p_r − y‖², p_r the recipe's merge of run r's experts; merged − ensemble is
  DiWA's locality term (plus any interference the ensemble does not have).

Each figure is the mean over a task's examples; ``mean`` is their mean over tasks. Every member
predicts every task's data (the tasks must share the label set). With one run, var and cov are
0 and bias² is the ensemble's error. Over checkpoints (the paper's Fig. 2, against training
duration), each matched checkpoint of the runs is decomposed the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergecli.analyze.runs import sweep_points
from mergecli.analyze.sweep import point_recipe
from mergecli.errors import EvaluationError, RecipeError
from mergecli.evaluate.predictions import Predictions
from mergecli.evaluate.score import Scorer
from mergecli.evaluate.tasks import Split
from mergecli.progress import CountBar
from mergecli.recipe import Recipe
from mergecli.seeds import seed_recipe

FIELDS = (
    "bias2",
    "variance",
    "covariance",
    "ensemble",
    "merged",
    "ensemble_accuracy",
    "merged_accuracy",
)


def analyze_diwa(
    recipe: Recipe,
    seeds: list[int] | None = None,
    split: Split = "validation",
    device: str = "cpu",
    bar: CountBar | None = None,
    over_checkpoints: bool = False,
    match: str = "step",
) -> dict[str, Any]:
    """The decomposition per task and its mean over tasks (see the module); with
    ``over_checkpoints`` the experts are training runs and every matched checkpoint (as in
    ``analyze interference --over-checkpoints``) is one point of ``points``."""
    if len(recipe.models) < 2:
        raise RecipeError("models: the decomposition needs at least two experts", key="models")
    runs = [seed_recipe(recipe, s) for s in seeds] if seeds else [recipe]
    scorers = [Scorer(run, device, bar, split=split) for run in runs]
    data = [[t.data for t in s.tasks] for s in scorers]
    if any(d != data[0] for d in data):
        raise RecipeError(
            "evaluate.data: every run must be scored on the same examples; keep {seed} out of "
            "the data paths",
            key="evaluate.data",
        )
    head: dict[str, Any] = {
        "analysis": "diwa",
        "method": recipe.merge_method,
        "data": "evaluate.test_data" if split == "test" else "evaluate.data",
        "members": [recipe.model_name(i) for i in range(len(recipe.models))],
        "seeds": seeds,
    }
    if not over_checkpoints:
        return {**head, **_decompose_runs(runs, scorers)}
    points = [sweep_points(run, match) for run in runs]
    where = [[(p.step, p.fraction) for p in run] for run in points]
    if any(w != where[0] for w in where):
        raise RecipeError(
            "--seeds: every seed's runs must have the same checkpoints", key="--seeds"
        )
    head["match"] = match
    head["points"] = [
        {
            "step": point.step,
            "fraction": point.fraction,
            **_decompose_runs(
                [point_recipe(run, p[k]) for run, p in zip(runs, points, strict=True)], scorers
            ),
        }
        for k, point in enumerate(points[0])
    ]
    return head


def _decompose_runs(runs: list[Recipe], scorers: list[Scorer]) -> dict[str, Any]:
    """Every task's terms over the runs (one recipe and its scorer per run) and their mean."""
    members: list[list[dict[str, Predictions]]] = []
    merges: list[dict[str, Predictions]] = []
    for run, scorer in zip(runs, scorers, strict=True):
        paths = [run.resolve_path(m.model) for m in run.models]
        members.append([{t.name: scorer.predictions(p, t) for t in scorer.tasks} for p in paths])
        merged = scorer.merged(run)
        merges.append({t.name: scorer.predictions(merged, t) for t in scorer.tasks})
    tasks: dict[str, Any] = {}
    for task in scorers[0].tasks:
        probs = [[member[task.name] for member in run] for run in members]
        tasks[task.name] = decompose(probs, [m[task.name] for m in merges], task.name)
    return {
        "tasks": tasks,
        "mean": {f: math.fsum(t[f] for t in tasks.values()) / len(tasks) for f in FIELDS},
    }


def decompose(
    members: list[list[Predictions]], merged: list[Predictions], task: str
) -> dict[str, Any]:
    """One task's terms from ``members[run][member]`` and ``merged[run]`` predictions."""
    labels = merged[0].labels
    if any(not torch.equal(p.labels, labels) for run in members for p in run):
        raise EvaluationError(f"task {task}: the runs read different labels")
    shapes = {p.probs.shape for run in members for p in run} | {p.probs.shape for p in merged}
    if len(shapes) != 1:
        raise EvaluationError(f"task {task}: the models predict different numbers of classes")
    probs = torch.stack([torch.stack([p.probs for p in run]) for run in members])  # R, M, n, C
    y = merged[0].onehot()
    count = probs.shape[1]
    mu = probs.mean(0)
    dev = probs - mu
    bias2 = ((mu.mean(0) - y) ** 2).sum(-1)
    variance = (dev**2).sum(-1).mean((0, 1))
    pairs = (dev.sum(1) ** 2).sum(-1) - (dev**2).sum((1, -1))  # R, n: Σ_{i≠j} ⟨dev_i, dev_j⟩
    covariance = pairs.mean(0) / (count * (count - 1))
    ensemble = ((probs.mean(1) - y) ** 2).sum(-1).mean(0)
    merge = torch.stack([((p.probs - y) ** 2).sum(-1) for p in merged]).mean(0)
    return {
        "examples": len(labels),
        "members": count,
        "runs": probs.shape[0],
        "bias2": float(bias2.mean()),
        "variance": float(variance.mean()),
        "covariance": float(covariance.mean()),
        "ensemble": float(ensemble.mean()),
        "merged": float(merge.mean()),
        "ensemble_accuracy": float(
            torch.stack(
                [
                    (probs[r].mean(0).argmax(-1) == labels).double().mean()
                    for r in range(probs.shape[0])
                ]
            ).mean()
        ),
        "merged_accuracy": float(torch.stack([p.correct().double().mean() for p in merged]).mean()),
    }
