"""Loss landscapes: the loss along an interpolation path and its barrier.

- ``linear``: θ(α) = (1 − α)·θA + α·θB (two models);
- ``task_arithmetic``: θ(α) = θ0 + α·Σ τt over the named models (one or more; needs a base);
- ``ties``: θ(α) = θ0 + α·τ_TIES, the TIES-merged task vector of the named models scaled by α
  (the α-interpolation of TIES in §4.2 and App. F of the optimiser-bias paper), with the
  recipe's TIES parameters (density, merge_func, ...; the defaults when it has none).

Each θ(α) is merged by the engine (``linear`` with weights 1 − α and α, ``task_arithmetic``
and ``ties`` with λ = α) and scored per task. Two barriers are measured on a curve L over the
α grid α0 < … < αn:

- ``barrier`` (the training-duration paper, §5.2): max_α L(α) − (L(α0) + L(αn))/2, the highest
  point above the mean of the ends;
- ``chord_barrier``: max_α L(α) − [(1 − s)·L(α0) + s·L(αn)] with s = (α − α0)/(αn − α0), the
  highest point above the straight chord between the ends (for the unit grid,
  max_α f(θα) − [(1−α)f(θA) + αf(θB)]). It is never below 0 and, unlike ``barrier``, is 0 on
  a straight line between ends of different heights.

For a higher-is-better score both are mirrored: (S(α0) + S(αn))/2 − min_α S(α) and
max_α [(1 − s)·S(α0) + s·S(αn) − S(α)].
"""

from __future__ import annotations

import itertools
from typing import Any

from mergecli.errors import RecipeError, did_you_mean
from mergecli.evaluate import Scorer
from mergecli.methods import get_method
from mergecli.recipe import ModelEntry, Recipe

PATHS = ("linear", "task_arithmetic", "ties")
FORMULAS = {
    "linear": "θ(α) = (1−α)·θA + α·θB",
    "task_arithmetic": "θ(α) = θ0 + α·Στ",
    "ties": "θ(α) = θ0 + α·τ_TIES",
}


def pick_models(recipe: Recipe, values: list[str]) -> list[ModelEntry]:
    """Models named in the recipe, or checkpoint folders."""
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    out = []
    for value in values:
        if value in names:
            index = names.index(value)
            out.append(ModelEntry(model=recipe.models[index].model, name=value))
        elif recipe.resolve_path(value).is_dir():
            out.append(ModelEntry(model=str(recipe.resolve_path(value))))
        else:
            raise RecipeError(
                f"--models: '{value}' is neither a model of the recipe nor a folder"
                f"{did_you_mean(value, names)}",
                key="--models",
            )
    return out


def path_recipe(recipe: Recipe, models: list[ModelEntry], path: str, alpha: float) -> Recipe:
    """The merge recipe of θ(α)."""
    if path == "linear":
        weighted = [
            m.model_copy(update={"parameters": {"weight": w}})
            for m, w in zip(models, (1 - alpha, alpha), strict=True)
        ]
        return recipe.model_copy(
            update={
                "merge_method": "linear",
                "models": weighted,
                "parameters": {"normalize": False},
            }
        )
    if path == "ties":
        keep = set(get_method("ties", "--path").resolve(recipe.parameters).param_names)
        parameters = {k: v for k, v in recipe.parameters.items() if k in keep}
        return recipe.model_copy(
            update={
                "merge_method": "ties",
                "models": models,
                "parameters": {**parameters, "lambda": alpha},
            }
        )
    return recipe.model_copy(
        update={
            "merge_method": "task_arithmetic",
            "models": models,
            "parameters": {"lambda": alpha},
        }
    )


def with_metric(recipe: Recipe, metric: str | None, source: str = "recipe") -> Recipe:
    """The recipe whose ``evaluate:`` section scores with the built-in ``metric`` instead of its
    own (unchanged when None; a command evaluator takes none); errors start with ``source``."""
    section = recipe.evaluate
    if section is None:
        raise RecipeError(
            f"{source}: no 'evaluate:' section saying which data to measure", key="evaluate"
        )
    if metric is None:
        return recipe
    if section.metric is None:
        raise RecipeError(
            "--metric: the recipe scores with a command; its score is used", key="--metric"
        )
    section = section.model_copy(update={"metric": metric, "higher_is_better": None})
    return recipe.model_copy(update={"evaluate": section})


def landscape_recipe(recipe: Recipe, metric: str | None = None, source: str = "recipe") -> Recipe:
    """The recipe whose ``evaluate:`` section measures the path: a built-in ``metric``
    (default loss), or the recipe's command (then no ``metric`` may be given); errors start
    with ``source``."""
    builtin = recipe.evaluate is not None and recipe.evaluate.metric is not None
    return with_metric(recipe, metric or ("loss" if builtin else None), source)


def barrier(values: list[float], higher_is_better: bool) -> float:
    """Height of the path above (below, for scores) the mean of its ends."""
    ends = (values[0] + values[-1]) / 2
    return ends - min(values) if higher_is_better else max(values) - ends


def chord(values: list[float], alphas: list[float]) -> list[float]:
    """The straight line between the curve's ends, at each α of the grid."""
    span = alphas[-1] - alphas[0]
    return [values[0] + (a - alphas[0]) / span * (values[-1] - values[0]) for a in alphas]


def chord_barrier(values: list[float], alphas: list[float], higher_is_better: bool) -> float:
    """Height of the path above (below, for scores) the chord between its ends."""
    line = chord(values, alphas)
    sign = -1.0 if higher_is_better else 1.0
    return max(sign * (v - c) for v, c in zip(values, line, strict=True))


def landscape(
    recipe: Recipe,
    scorer: Scorer,
    models: list[str],
    path: str = "linear",
    alphas: list[float] | None = None,
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """The curve per task and its mean over tasks on the α grid, with their barriers."""
    if path not in PATHS:
        raise RecipeError(
            f"--path: '{path}' is not linear, task_arithmetic or ties{did_you_mean(path, PATHS)}",
            key="--path",
        )
    entries = pick_models(recipe, models)
    if path == "linear" and len(entries) != 2:
        raise RecipeError(
            f"--models: the linear path needs two models, got {len(entries)}", key="--models"
        )
    if path != "linear" and not recipe.base_model:
        raise RecipeError(
            f"base_model: the {path} path {FORMULAS[path]} needs a base model", key="base_model"
        )
    alphas = alphas or [round(0.1 * k, 10) for k in range(11)]
    if len(alphas) < 2:
        raise RecipeError("--alphas: a path needs at least two values of α", key="--alphas")
    if any(b <= a for a, b in itertools.pairwise(alphas)):
        raise RecipeError("--alphas: the α grid must increase", key="--alphas")
    chosen = _tasks(scorer, recipe, entries, tasks)
    curves: dict[str, list[float]] = {t.name: [] for t in chosen}
    handle = scorer.bar.add("landscape", len(alphas))
    calls = [(path_recipe(recipe, entries, path, alpha), chosen) for alpha in alphas]
    for merged in scorer.each("merge", calls):
        for name, value in merged.tasks.items():
            curves[name].append(value)
        scorer.bar.advance(handle)
    scorer.bar.done(handle)
    mean = [sum(c[i] for c in curves.values()) / len(curves) for i in range(len(alphas))]
    result: dict[str, Any] = {
        "path": path,
        "path_formula": FORMULAS[path],
        "models": [m.name or m.model for m in entries],
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "alphas": alphas,
        "tasks": curves,
        "mean": mean,
        "barrier": barrier(mean, scorer.higher_is_better),
        "chord_barrier": chord_barrier(mean, alphas, scorer.higher_is_better),
        "task_barriers": {n: barrier(c, scorer.higher_is_better) for n, c in curves.items()},
        "task_chord_barriers": {
            n: chord_barrier(c, alphas, scorer.higher_is_better) for n, c in curves.items()
        },
    }
    return scorer.record_placements(result)


def _tasks(scorer: Scorer, recipe: Recipe, entries: list[ModelEntry], names: list[str] | None):
    """--task names, else the tasks whose experts are on the path, else every task."""
    known = [t.name for t in scorer.tasks]
    if names:
        for name in names:
            if name not in known:
                raise RecipeError(
                    f"--task: no task '{name}'{did_you_mean(name, known)}", key="--task"
                )
        return [t for t in scorer.tasks if t.name in names]
    on_path = {e.name for e in entries}
    mine = [
        t for t in scorer.tasks if t.expert is not None and recipe.model_name(t.expert) in on_path
    ]
    return mine or scorer.tasks
