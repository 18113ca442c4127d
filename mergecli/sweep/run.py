"""A hyperparameter sweep: score the merge at every grid point, keep the best."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mergecli.errors import MergeError
from mergecli.evaluate import Evaluation, Scorer
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
        raise MergeError("--patience: expected a whole number ≥ 1")
    points = grid_points(axes)
    rows: list[dict[str, Any]] = []
    best: tuple[int, Evaluation] | None = None
    since_best = 0
    handle = scorer.bar.add("sweep", len(points))
    for point in points:
        result = scorer.recipe(apply_point(recipe, axes, point))
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
    return table, best[1].recipe


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
