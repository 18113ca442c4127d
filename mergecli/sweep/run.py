"""A hyperparameter sweep: score the merge at every grid point, keep the best."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mergecli.engine.merge import run_merge
from mergecli.engine.output import output_errors
from mergecli.engine.plan import plan_merge
from mergecli.errors import RecipeError
from mergecli.evaluate import Evaluation, Scorer, score_recipe
from mergecli.jsonsafe import strict_json
from mergecli.recipe import Recipe
from mergecli.sweep.grid import Axis, apply_point, grid_points


def sweep_grid(
    recipe: Recipe, axes: list[Axis], scorer: Scorer, patience: int | None = None
) -> tuple[dict[str, Any], Recipe]:
    """Score every point in grid order; stop after ``patience`` points in a row that do not
    beat the best so far. Returns the table and the best point's recipe (a greedy soup's
    selected experts)."""
    if patience is not None and patience < 1:
        raise RecipeError("--patience: expected a whole number ≥ 1", key="--patience")
    points = grid_points(axes)
    rows: list[dict[str, Any]] = []
    best: tuple[int, Evaluation] | None = None
    since_best = 0
    handle = scorer.bar.add("sweep", len(points))
    candidates = [(apply_point(recipe, axes, point),) for point in points]
    for point, result in zip(points, scorer.each(score_recipe, candidates), strict=False):
        rows.append(
            {"parameters": point, "tasks": result.tasks, "score": result.score, **result.details}
        )
        scorer.bar.advance(handle)
        if best is None or scorer.better(result.score, best[1].score):
            best, since_best = (len(rows) - 1, result), 0
        else:
            since_best += 1
        if patience is not None and since_best >= patience:
            break
    scorer.bar.done(handle)
    assert best is not None and best[1].recipe is not None
    table = {
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "method": recipe.merge_method,
        "grid": {a.label: a.values for a in axes},
        "tasks": [t.name for t in scorer.tasks],
        "points": len(points),
        "evaluated": len(rows),
        "stopped_early": len(rows) < len(points),
        "rows": rows,
        "best": rows[best[0]],
    }
    return scorer.record_placements(table), best[1].recipe


def sweep(
    recipe: Recipe,
    axes: list[Axis],
    scorer: Scorer,
    output: Path,
    force: bool = False,
    patience: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``sweep_grid``, then the best point's merge written to ``output`` with ``sweep.json``
    and ``sweep.csv`` inside; the table gains ``output`` and ``files``."""
    table, best = sweep_grid(recipe, axes, scorer, patience)
    plan = plan_merge(best, device=device, experts_selected=True)  # best lists a soup's choice
    result = run_merge(plan, output, force=force)
    table["output"] = str(result.output)
    with output_errors(result.output):
        table["files"] = [str(p) for p in write_table(table, result.output)]
    return table


def write_table(table: dict[str, Any], folder: Path, stem: str = "sweep") -> list[Path]:
    """``stem.json`` (everything) and ``stem.csv`` (one row per point) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    json_path.write_text(strict_json(table)[0] + "\n")
    labels = list(table["grid"])
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*labels, *table["tasks"], "score"])
        for row in table["rows"]:
            writer.writerow(
                [
                    *(row["parameters"][k] for k in labels),
                    *(row["tasks"][t] for t in table["tasks"]),
                    row["score"],
                ]
            )
    return [json_path, csv_path]
