"""Runs that differ only by seed: one recipe with ``{seed}`` in its paths, run per seed, and
every number of the results as mean ± std over the seeds.

``{seed}`` may appear in ``base_model``, the models' paths and the ``evaluate:`` data paths.
Results are aggregated leaf by leaf: numbers become their mean (``std`` holds the sample
standard deviation, n − 1 in the denominator; 0 for one seed), values equal across seeds stay,
other values (and lists of other lengths, such as warnings) become the list of per-seed values.
Lists of points must have the same length in every seed; ``per_seed`` keeps every seed's
result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from mergecli.errors import RecipeError
from mergecli.recipe import EvalTask, Recipe

SEED = "{seed}"


def _fill(value: str | None, seed: int) -> str | None:
    return None if value is None else value.replace(SEED, str(seed))


def seed_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe with ``{seed}`` replaced in its model and data paths."""
    models = [m.model_copy(update={"model": _fill(m.model, seed)}) for m in recipe.models]
    update: dict[str, Any] = {"models": models, "base_model": _fill(recipe.base_model, seed)}
    section = recipe.evaluate
    if section is not None:
        tasks = section.tasks
        if isinstance(tasks, dict):
            tasks = {
                name: EvalTask(
                    data=_fill(t.data, seed), test_data=_fill(t.test_data, seed), expert=t.expert
                )
                for name, t in tasks.items()
            }
        update["evaluate"] = section.model_copy(
            update={
                "data": _fill(section.data, seed),
                "test_data": _fill(section.test_data, seed),
                "tasks": tasks,
            }
        )
    return recipe.model_copy(update=update)


def uses_seed(recipe: Recipe) -> bool:
    """Whether ``{seed}`` appears in a path of the recipe."""
    return seed_recipe(recipe, 0) != recipe


def over_seeds(
    run: Callable[[Recipe], dict[str, Any]], recipe: Recipe, seeds: list[int]
) -> dict[str, Any]:
    """``run`` on the recipe of each seed, aggregated (see the module)."""
    if not uses_seed(recipe):
        raise RecipeError(
            "--seeds: no path of the recipe contains {seed} (e.g. runs/{seed}/math)", "models"
        )
    if len(set(seeds)) != len(seeds) or not seeds:
        raise RecipeError("--seeds: expected distinct seeds (0,1,2)", key="--seeds")
    return aggregate([run(seed_recipe(recipe, s)) for s in seeds], seeds)


def aggregate(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean of every number, with ``std``, ``seeds`` and ``per_seed``."""
    mean = _leaves(results, statistics.fmean, "")
    mean["std"] = _leaves(results, _std, "")
    mean["seeds"] = seeds
    mean["per_seed"] = results
    return mean


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _leaves(values: list[Any], how: Callable[[list[float]], float], where: str) -> Any:
    first = values[0]
    if all(isinstance(v, dict) for v in values):
        keys = [k for k in first if all(k in v for v in values)]
        return {k: _leaves([v[k] for v in values], how, f"{where}.{k}") for k in keys}
    if all(isinstance(v, list) for v in values):
        if len({len(v) for v in values}) > 1 and not any(
            isinstance(i, dict) for v in values for i in v
        ):
            return None if how is _std else values
        if len({len(v) for v in values}) > 1:
            raise RecipeError(
                f"--seeds: the seeds give {where.lstrip('.') or 'results'} of different lengths "
                f"({', '.join(str(len(v)) for v in values)}); their points do not match",
                key="--seeds",
            )
        return [_leaves(list(items), how, where) for items in zip(*values, strict=True)]
    if all(_number(v) for v in values):
        result = how([float(v) for v in values])
        return result if math.isfinite(result) else None
    if how is _std:
        return None
    return first if all(v == first for v in values) else values
