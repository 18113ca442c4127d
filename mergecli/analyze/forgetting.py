"""Which examples a merge forgets, by difficulty, and how the experts memorised them
(undertraining-experts §4, Fig. 3 left and Fig. 4, App. H).

On each task's data (the ``evaluate:`` section's, validation or test; the paper uses the
training set), for the task's expert E, the recipe's merge W, early checkpoints e₁…e_R (one per
run, for EL2N) and a comparison checkpoint c (App. H's early model, default e₁):

- EL2N and difficulty bins as in ``mergecli.analyze.difficulty``;
- forgotten: E predicts the label and W does not (argmax); per bin the number forgotten, its
  share of the task's forgotten examples (Fig. 4, sums to 1) and the rate forgotten / examples
  E gets right in the bin;
- loss share: the bin's share of E's summed cross-entropy (Fig. 3 left);
- App. H.1 from c ("early") to E ("late"): Δm = m_E − m_c with m = p_y − max_{c≠y} p_c,
  Δℓ = ℓ_c − ℓ_E with ℓ = −log p_y, shift = ‖p_E − p_c‖₁, as means per bin.

Task figures are means over the task's examples; the summary over tasks is the mean of the
per-task values (App. H's mean-of-means), leaving out a task where a value is undefined (no
forgotten example, no example E gets right in a bin).
"""

from __future__ import annotations

import math
from typing import Any

from mergecli.analyze.difficulty import checkpoint_for, el2n, quantile_bins
from mergecli.errors import RecipeError
from mergecli.evaluate.predictions import Predictions
from mergecli.evaluate.score import Scorer
from mergecli.evaluate.tasks import Split
from mergecli.progress import CountBar
from mergecli.recipe import Recipe

BIN_FIELDS = (
    "forgotten_share",
    "forgotten_rate",
    "loss_share",
    "delta_margin",
    "delta_loss",
    "shift",
)
HARDEST = 0.3
"""The summary's ``hardest_share``: forgotten examples in the hardest 30 % of the bins."""


def analyze_forgetting(
    recipe: Recipe,
    early: list[str],
    compare: str | None = None,
    bins: int = 10,
    split: Split = "validation",
    device: str = "cpu",
    bar: CountBar | None = None,
) -> dict[str, Any]:
    """The forgetting and memorisation analysis of a recipe's merge (see the module)."""
    if not early:
        raise RecipeError(
            "--early: name at least one early checkpoint (e.g. runs/{task}/checkpoint-15)",
            key="--early",
        )
    if bins < 1:
        raise RecipeError(f"--bins {bins}: must be at least 1", key="--bins")
    scorer = Scorer(recipe, device, bar, split=split)
    tasks = [t for t in scorer.tasks if t.expert is not None]
    if not tasks:
        raise RecipeError(
            "evaluate.tasks: no task has an expert among the recipe's models (name a task like "
            "its model, or set its 'expert')",
            key="evaluate.tasks",
        )
    merged = scorer.merged(recipe)
    compare = compare or early[0]
    results: dict[str, Any] = {}
    for task in tasks:
        expert = recipe.resolve_path(recipe.models[task.expert].model)  # type: ignore[index]
        runs = [scorer.predictions(checkpoint_for(recipe, t, task, "--early"), task) for t in early]
        results[task.name] = task_forgetting(
            scorer.predictions(expert, task),
            scorer.predictions(merged, task),
            runs,
            scorer.predictions(checkpoint_for(recipe, compare, task, "--compare"), task),
            bins,
            task.name,
        )
        results[task.name]["expert"] = recipe.model_name(task.expert)  # type: ignore[arg-type]
    return {
        "analysis": "forgetting",
        "method": recipe.merge_method,
        "data": "evaluate.test_data" if split == "test" else "evaluate.data",
        "bins": bins,
        "early": early,
        "compare": compare,
        "tasks": results,
        "mean": summarize(results, bins),
    }


def task_forgetting(
    expert: Predictions,
    merged: Predictions,
    early: list[Predictions],
    compare: Predictions,
    bins: int,
    name: str,
) -> dict[str, Any]:
    """One task's figures from the per-example predictions of its models."""
    scores = el2n(early)
    which = quantile_bins(scores, bins, name)
    right = expert.correct()
    forgotten = right & ~merged.correct()
    loss = expert.loss()
    delta_margin = expert.margin() - compare.margin()
    delta_loss = compare.loss() - loss
    shift = (expert.probs - compare.probs).abs().sum(1)
    rows = []
    for b in range(1, bins + 1):
        mask = which == b
        lost = int(forgotten[mask].sum())
        rows.append(
            {
                "bin": b,
                "examples": int(mask.sum()),
                "el2n_range": [float(scores[mask].min()), float(scores[mask].max())],
                "expert_correct": int(right[mask].sum()),
                "forgotten": lost,
                "forgotten_share": _ratio(lost, int(forgotten.sum())),
                "forgotten_rate": _ratio(lost, int(right[mask].sum())),
                "loss_share": _ratio(float(loss[mask].sum()), float(loss.sum())),
                "delta_margin": float(delta_margin[mask].mean()),
                "delta_loss": float(delta_loss[mask].mean()),
                "shift": float(shift[mask].mean()),
            }
        )
    return {
        "examples": len(scores),
        "accuracy": {
            "expert": float(right.double().mean()),
            "merged": float(merged.correct().double().mean()),
            "compare": float(compare.correct().double().mean()),
        },
        "forgotten": int(forgotten.sum()),
        "per_bin": rows,
        "per_example": {
            "el2n": scores.tolist(),
            "bin": which.tolist(),
            "forgotten": forgotten.nonzero()[:, 0].tolist(),
        },
    }


def summarize(tasks: dict[str, Any], bins: int) -> dict[str, Any]:
    """Mean over tasks of every per-bin figure, and the hardest bins' forgotten share."""
    rows = []
    for b in range(bins):
        row: dict[str, Any] = {"bin": b + 1}
        for field in BIN_FIELDS:
            row[field] = _mean([t["per_bin"][b][field] for t in tasks.values()])
        rows.append(row)
    hardest = max(1, math.ceil(HARDEST * bins))
    shares = [
        sum(r["forgotten_share"] for r in t["per_bin"][-hardest:])
        for t in tasks.values()
        if t["forgotten"]
    ]
    return {
        "per_bin": rows,
        "hardest_bins": hardest,
        "hardest_share": _mean(shares),
        "forgotten": sum(t["forgotten"] for t in tasks.values()),
        "accuracy": {
            k: _mean([t["accuracy"][k] for t in tasks.values()])
            for k in ("expert", "merged", "compare")
        },
    }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None
