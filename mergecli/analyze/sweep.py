"""Interference over training: the analysis at each matched checkpoint of the experts' runs."""

from __future__ import annotations

from typing import Any

from mergecli.analyze.interference import TALL_LAMBDA, TOP_K, analyze_interference
from mergecli.analyze.runs import Point, sweep_points
from mergecli.distributed.executor import LocalExecutor, RayExecutor, Resources
from mergecli.progress import Progress
from mergecli.recipe import Recipe


def point_recipe(recipe: Recipe, point: Point) -> Recipe:
    """The recipe with each run replaced by its checkpoint at this point (names kept)."""
    models = [
        m.model_copy(update={"model": str(path), "name": recipe.model_name(i)})
        for i, (m, path) in enumerate(zip(recipe.models, point.paths, strict=True))
    ]
    return recipe.model_copy(update={"models": models})


def analyze_over_checkpoints(
    recipe: Recipe,
    match: str = "step",
    top_k: float = TOP_K,
    tall_lambda: float = TALL_LAMBDA,
    device: str = "cpu",
    progress: Progress | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
) -> dict[str, Any]:
    """``analyze_interference`` at every point of the sweep (see ``runs`` for the matching);
    with a Ray executor each point is a task (no progress shown) and ``executor`` in the result
    says which node analysed which point."""
    points = sweep_points(recipe, match)
    executor = executor or LocalExecutor()
    remote = executor.kind == "ray"
    for point in points:
        executor.submit(
            analyze_interference,
            point_recipe(recipe, point),
            top_k,
            tall_lambda,
            device,
            None if remote else progress,
            resources=Resources.for_device(device),
        )
    analyses = []
    for done in executor.results():
        if done.error is not None:
            raise done.error
        analyses.append(done)
    result: dict[str, Any] = {
        "match": match,
        "experts": [recipe.model_name(i) for i in range(len(recipe.models))],
        "top_k": top_k,
        "tall_lambda": tall_lambda,
        "points": [
            {
                "step": point.step,
                "fraction": point.fraction,
                "steps": point.steps,
                "checkpoints": [str(p) for p in point.paths],
                **done.value,
            }
            for point, done in zip(points, analyses, strict=True)
        ],
    }
    if remote:
        result["executor"] = {"kind": "ray", "tasks": [d.where for d in analyses]}
    return result
