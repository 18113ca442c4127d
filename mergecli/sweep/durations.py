"""Merging over training duration (Figure 1 of the training-duration paper).

The experts are training-run folders with ``checkpoint-<step>`` subfolders. Each point of the
sweep picks one checkpoint per run:

- ``by="step"``: every step that all runs saved (``mergecli.analyze.runs``);
- ``by="tstar"``: multiples m of each expert's T* (its step of minimum validation loss,
  ``mergecli.sweep.stopping``), each run taking the checkpoint nearest m·T* (ties: the
  earlier). Multiples that pick the same checkpoints give one point.

With a patience P, one more point takes each run's early-stopped checkpoint (Alg. 1 of the
undertraining paper, on the recipe's validation metric; ``stopping.early_stop``).

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
from mergecli.distributed.executor import LocalExecutor, RayExecutor
from mergecli.errors import RecipeError, did_you_mean
from mergecli.evaluate import Scorer, score_recipe
from mergecli.evaluate.protocol import protocol, report
from mergecli.methods import get_method
from mergecli.progress import CountBar
from mergecli.recipe import Recipe
from mergecli.seeds import over_seeds
from mergecli.sweep.grid import Axis, method_axes
from mergecli.sweep.run import sweep_grid
from mergecli.sweep.stopping import checkpoint_scores, early_stop, tstar_steps

MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
BY = ("step", "tstar")
MOE = "moe"
"""The method name of the recipe's mixture of experts in a sweep."""


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
    axes: list[Axis] | None = None,
    test: Scorer | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """Merged and expert scores at each training duration, per method.

    With ``axes`` (a ``--grid``), each method's parameters among them are chosen at every
    duration by a grid sweep on the validation data (``sweep_grid``); a method that takes none
    of them merges as is. With a ``test`` scorer, the merge chosen at each point and the experts
    are also scored on the test data (``test``, ``experts_test``), and the best duration of
    each method is still chosen on validation. With ``patience``, ``early_stop`` holds the
    point of the runs' early-stopped checkpoints.
    """
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
    tuned = {
        m: [] if m == MOE else method_axes(axes or [], method_recipe(recipe, m)) for m in methods
    }
    unused = [a.label for a in axes or [] if not any(a in t for t in tuned.values())]
    if unused:
        raise RecipeError(
            f"--grid {unused[0]}: none of the methods ({', '.join(methods)}) takes it",
            key="--grid",
        )
    result: dict[str, Any] = {
        "by": by,
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "methods": methods,
        "experts": [recipe.model_name(i) for i in range(len(recipe.models))],
        "tasks": [t.name for t in scorer.tasks],
        "grid": {m: {a.label: a.values for a in t} for m, t in tuned.items() if t},
        "protocol": protocol(test),
    }
    if by == "tstar":
        runs = tstar_steps(recipe, scorer)
        result["tstar"] = {name: run["tstar"] for name, run in runs.items()}
        result["tstar_source"] = {name: run["source"] for name, run in runs.items()}
        result["validation_loss"] = {name: run["losses"] for name, run in runs.items()}
        points = tstar_points(recipe, result["tstar"], list(multiples or MULTIPLES))
    else:
        points = sweep_points(recipe, "step")
    stopped = _early_stop_point(recipe, scorer, patience) if patience is not None else None
    count = (len(points) + (stopped is not None)) * len(methods)
    handle = scorer.bar.add("durations", count)

    def score_point(point: Point) -> dict[str, Any]:
        at = point_recipe(recipe, point)
        experts = scorer.expert_scores(at)
        row: dict[str, Any] = {
            "x": point.step if by == "step" else point.fraction,
            "steps": point.steps,
            "checkpoints": [str(p) for p in point.paths],
            "experts": experts,
            "expert_score": _mean(experts),
            "methods": {},
        }
        if test is not None:
            row["experts_test"] = test.expert_scores(at)
            row["expert_test_score"] = _mean(row["experts_test"])
        for method in methods:
            row["methods"][method] = _score_method(
                method_recipe(at, method), tuned[method], scorer, test
            )
            scorer.bar.advance(handle)
        return row

    rows = [score_point(point) for point in points]
    if stopped is not None:
        point, scores = stopped
        result["early_stop"] = {"patience": patience, "checkpoint_scores": scores}
        result["early_stop"].update(score_point(point))
        if by == "tstar":
            multiples_of = zip(result["experts"], point.steps, strict=True)
            result["early_stop"]["x"] = _mean(
                {n: s / result["tstar"][n] for n, s in multiples_of if s is not None}
            )
    scorer.bar.done(handle)
    result["points"] = rows
    result["best"] = {
        method: rows[scorer.best([r["methods"][method]["score"] for r in rows])]["x"]
        for method in methods
    }
    return scorer.record_placements(result)


def sweep_training(
    recipe: Recipe,
    device: str = "cpu",
    bar: CountBar | None = None,
    by: str = "tstar",
    methods: list[str] | None = None,
    multiples: list[float] | None = None,
    axes: list[Axis] | None = None,
    patience: int | None = None,
    seeds: list[int] | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
) -> dict[str, Any]:
    """``sweep_durations`` on the recipe's validation data (evaluations as Ray tasks with a Ray
    ``executor``), reported on its ``evaluate.test_data`` when it names one; with ``seeds``,
    once per seed (``{seed}`` in the recipe's paths) and aggregated as mean ± std
    (``mergecli.seeds.over_seeds``)."""

    def run(one: Recipe) -> dict[str, Any]:
        scorer = Scorer(one, device, bar, executor)
        return sweep_durations(
            one, scorer, by, methods, multiples, axes, scorer.on_test(), patience
        )

    return run(recipe) if seeds is None else over_seeds(run, recipe, seeds)


def _early_stop_point(
    recipe: Recipe, scorer: Scorer, patience: int
) -> tuple[Point, dict[str, dict[int, float]]]:
    """Each run's early-stopped checkpoint on its validation scores, and those scores."""
    scores = checkpoint_scores(recipe, scorer)
    steps: list[int | None] = []
    paths: list[Path] = []
    for i, entry in enumerate(recipe.models):
        path = recipe.resolve_path(entry.model)
        run = run_checkpoints(path)
        name = recipe.model_name(i)
        if run and name not in scores:
            raise RecipeError(
                f"--stop-patience: no evaluate task has '{name}' as its expert, so its "
                "validation score is unknown (set evaluate.tasks.<task>.expert)",
                "evaluate.tasks",
            )
        step = early_stop(scores[name], scorer.higher_is_better, patience) if run else None
        steps.append(step)
        paths.append(run[step] if step is not None else path)
    return Point(None, 0.0, steps, paths), scores


def _mean(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def _score_method(
    recipe: Recipe, axes: list[Axis], scorer: Scorer, test: Scorer | None
) -> dict[str, Any]:
    """One method at one point: its validation scores (the best of the grid when it has one,
    with the chosen parameters and every grid point's score) and the chosen merge's test
    scores."""
    chosen: Recipe | None
    out: dict[str, Any]
    if axes:
        table, chosen = sweep_grid(recipe, axes, scorer)
        out = {
            "tasks": table["best"]["tasks"],
            "score": table["best"]["score"],
            "parameters": table["best"]["parameters"],
            "grid": [{"parameters": r["parameters"], "score": r["score"]} for r in table["rows"]],
        }
    else:
        merged = score_recipe(scorer, recipe)
        chosen = merged.recipe
        out = {"tasks": merged.tasks, "score": merged.score, **merged.details}
    reported = report(test, chosen)
    if reported is not None:
        out["test"] = reported
    return out
