"""Loss barriers averaged over expert pairs, at one point or over training.

For every pair (A, B) of the recipe's experts, in recipe order, the linear path
θ(α) = (1 − α)·θA + α·θB is scored on the pair's tasks (``landscape``: the tasks whose experts
are A or B, their mean curve), and both barriers of ``mergecli.sweep.landscape`` are taken:
``barrier`` (max − mean of the ends, the training-duration paper's §5.2) and ``chord_barrier``
(max over α of f(θα) − [(1−α)f(θA) + αf(θB)]). Each point reports them per pair and their
mean over pairs.

With ``over_checkpoints`` the experts are training runs (``checkpoint-<step>`` folders) and the
pairs are measured at every point of ``sweep.durations``: each step every run saved
(``by="step"``) or multiples of each run's T* (``by="tstar"``), as in Figure 3 of the
training-duration paper (the mean barrier over expert pairs against training duration); the
result adds the mean over points of the pair means.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from mergecli.analyze.runs import Point, sweep_points
from mergecli.analyze.sweep import point_recipe
from mergecli.errors import RecipeError, did_you_mean
from mergecli.evaluate import Scorer
from mergecli.recipe import Recipe
from mergecli.sweep.durations import BY, MULTIPLES, tstar_points
from mergecli.sweep.landscape import landscape
from mergecli.sweep.stopping import tstar_steps

KINDS = ("barrier", "chord_barrier")


def pair_barriers(recipe: Recipe, scorer: Scorer, alphas: list[float] | None) -> dict[str, Any]:
    """Both barriers of every pair of the recipe's experts, and their means over pairs."""
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    if len(names) < 2:
        raise RecipeError(
            f"models: barriers between pairs need two experts or more, got {len(names)}",
            key="models",
        )
    pairs = []
    for a, b in itertools.combinations(names, 2):
        curve = landscape(recipe, scorer, [a, b], "linear", alphas)
        pairs.append(
            {
                "models": [a, b],
                "tasks": list(curve["tasks"]),
                "mean": curve["mean"],
                **{kind: curve[kind] for kind in KINDS},
            }
        )
    return {
        "pairs": pairs,
        **{kind: math.fsum(p[kind] for p in pairs) / len(pairs) for kind in KINDS},
    }


def barriers(
    recipe: Recipe,
    scorer: Scorer,
    alphas: list[float] | None = None,
    over_checkpoints: bool = False,
    by: str = "tstar",
    multiples: list[float] | None = None,
) -> dict[str, Any]:
    """Barriers of every expert pair (``pair_barriers``), once or at each training point."""
    alphas = alphas or [round(0.1 * k, 10) for k in range(11)]
    result: dict[str, Any] = {
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "alphas": alphas,
        "experts": [recipe.model_name(i) for i in range(len(recipe.models))],
    }
    if not over_checkpoints:
        result.update(pair_barriers(recipe, scorer, alphas))
        return scorer.record_placements(result)
    if by not in BY:
        raise RecipeError(f"--by: '{by}' is not step or tstar{did_you_mean(by, BY)}", key="--by")
    result["by"] = by
    points: list[Point]
    if by == "tstar":
        result["tstar"] = {n: run["tstar"] for n, run in tstar_steps(recipe, scorer).items()}
        points = tstar_points(recipe, result["tstar"], list(multiples or MULTIPLES))
    else:
        points = sweep_points(recipe, "step")
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "x": point.step if by == "step" else point.fraction,
            "steps": point.steps,
        }
        row.update(pair_barriers(point_recipe(recipe, point), scorer, alphas))
        rows.append(row)
    result["points"] = rows
    for kind in KINDS:
        result[kind] = math.fsum(r[kind] for r in rows) / len(rows)
    return scorer.record_placements(result)
