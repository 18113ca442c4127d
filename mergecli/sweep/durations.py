"""Merging over training duration (Figure 1 of the training-duration paper).

The experts are training-run folders with ``checkpoint-<step>`` subfolders. Each point of the
sweep picks one checkpoint per run:

- ``by="step"``: every step that all runs saved (``mergecli.analyze.runs``);
- ``by="tstar"``: multiples m of each expert's best-validation step T* (the checkpoint whose
  score on the expert's own task is best; ties: the earlier), each run taking the checkpoint
  nearest m·T* (ties: the earlier). Multiples that pick the same checkpoints give one point.

At each point every method merges the chosen checkpoints (``moe``: upcycles them into the
recipe's mixture of experts); the expert score is the mean over
tasks of each task's expert on its own task. An expert that is not a run is the same at every
point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecli.analyze.runs import Point, run_checkpoints, sweep_points
from mergecli.analyze.sweep import point_recipe
from mergecli.errors import RecipeError, did_you_mean
from mergecli.evaluate import Scorer, score_recipe
from mergecli.methods import get_method
from mergecli.recipe import Recipe

MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
BY = ("step", "tstar")
MOE = "moe"
"""The method name of the recipe's mixture of experts in a sweep."""


def best_steps(recipe: Recipe, scorer: Scorer) -> dict[str, dict[str, Any]]:
    """T* of each run: its checkpoints' scores on the run's own tasks and the best step."""
    out = {}
    for i, entry in enumerate(recipe.models):
        run = run_checkpoints(recipe.resolve_path(entry.model))
        if not run:
            continue
        tasks = [t for t in scorer.tasks if t.expert == i]
        name = recipe.model_name(i)
        if not tasks:
            raise RecipeError(
                f"--by tstar: no evaluate task has '{name}' as its expert, so its "
                "best-validation step is unknown (set evaluate.tasks.<task>.expert)",
                key="--by",
            )
        calls = [(path, tasks) for path in run.values()]
        scores = {step: e.score for step, e in zip(run, scorer.each("model", calls), strict=True)}
        steps = list(scores)
        out[name] = {"scores": scores, "tstar": steps[scorer.best(list(scores.values()))]}
    if not out:
        raise RecipeError(
            "--over-checkpoints: no expert names a training-run folder with checkpoint-<step> "
            "subfolders",
            key="--over-checkpoints",
        )
    return out


def tstar_points(recipe: Recipe, tstar: dict[str, int], multiples: list[float]) -> list[Point]:
    """One point per multiple of T*. Multiples that pick the same checkpoints (below a run's
    first or beyond its last checkpoint) give one point, labelled by the multiple that the
    chosen steps match best (least Σ |m·T* − step| / T*; ties: the smaller multiple)."""
    best: dict[tuple[Path, ...], tuple[float, Point]] = {}
    runs = [(p, run_checkpoints(p)) for p in (recipe.resolve_path(e.model) for e in recipe.models)]
    for multiple in multiples:
        steps: list[int | None] = []
        paths: list[Path] = []
        error = 0.0
        for i, (path, run) in enumerate(runs):
            if not run:
                steps.append(None)
                paths.append(path)
                continue
            target = multiple * tstar[recipe.model_name(i)]
            step = nearest(run, target)
            error += abs(target - step) / tstar[recipe.model_name(i)]
            steps.append(step)
            paths.append(run[step])
        key = tuple(paths)
        if key not in best or error < best[key][0]:
            best[key] = (error, Point(None, multiple, steps, paths))
    return sorted((point for _, point in best.values()), key=lambda p: p.fraction)


def nearest(steps: dict[int, Path], target: float) -> int:
    """The step closest to ``target`` (ties: the earlier step)."""
    return min(steps, key=lambda s: (abs(s - target), s))


def method_recipe(recipe: Recipe, method: str) -> Recipe:
    """The recipe merged with another method: parameters that method does not take are
    dropped. ``moe`` is the recipe's mixture of experts (its ``moe:`` section), unchanged."""
    if method == MOE:
        return recipe
    spec = get_method(method, "--methods").resolve(recipe.parameters)
    keep = set(spec.param_names)
    models = [
        m.model_copy(update={"parameters": {k: v for k, v in m.parameters.items() if k in keep}})
        for m in recipe.models
    ]
    parameters = {k: v for k, v in recipe.parameters.items() if k in keep}
    return recipe.model_copy(
        update={"merge_method": method, "parameters": parameters, "models": models, "moe": None}
    )


def sweep_durations(
    recipe: Recipe,
    scorer: Scorer,
    by: str = "tstar",
    methods: list[str] | None = None,
    multiples: list[float] | None = None,
) -> dict[str, Any]:
    """Merged and expert scores at each training duration, per method."""
    if by not in BY:
        raise RecipeError(f"--by: '{by}' is not step or tstar{did_you_mean(by, BY)}", key="--by")
    methods = methods or [recipe.merge_method or MOE]
    for method in methods:
        if method != MOE:
            get_method(method, "--methods")
        elif recipe.moe is None:
            raise RecipeError(
                "--methods: moe upcycles with the recipe's moe: section; it has none",
                key="--methods",
            )
    result: dict[str, Any] = {
        "by": by,
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "methods": methods,
        "experts": [recipe.model_name(i) for i in range(len(recipe.models))],
        "tasks": [t.name for t in scorer.tasks],
    }
    if by == "tstar":
        runs = best_steps(recipe, scorer)
        result["tstar"] = {name: run["tstar"] for name, run in runs.items()}
        result["checkpoint_scores"] = {name: run["scores"] for name, run in runs.items()}
        points = tstar_points(recipe, result["tstar"], list(multiples or MULTIPLES))
    else:
        points = sweep_points(recipe, "step")
    handle = scorer.bar.add("durations", len(points) * len(methods))
    rows = []
    for point in points:
        at = point_recipe(recipe, point)
        experts = scorer.expert_scores(at)
        row: dict[str, Any] = {
            "x": point.step if by == "step" else point.fraction,
            "steps": point.steps,
            "checkpoints": [str(p) for p in point.paths],
            "experts": experts,
            "expert_score": sum(experts.values()) / len(experts) if experts else None,
            "methods": {},
        }
        candidates = [(method_recipe(at, method),) for method in methods]
        for method, merged in zip(methods, scorer.each(score_recipe, candidates), strict=True):
            row["methods"][method] = {
                "tasks": merged.tasks,
                "score": merged.score,
                **merged.details,
            }
            scorer.bar.advance(handle)
        rows.append(row)
    scorer.bar.done(handle)
    result["points"] = rows
    result["best"] = {
        method: rows[scorer.best([r["methods"][method]["score"] for r in rows])]["x"]
        for method in methods
    }
    return scorer.record_placements(result)
