"""The scores of ``mergecli evaluate``: the recipe's merge, or given checkpoint and artifact
folders, per task and their mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecli.evaluate.score import Evaluation, Scorer
from mergecli.evaluate.selection import score_recipe
from mergecli.jsonsafe import strict_json
from mergecli.recipe import Recipe


def evaluation_table(
    scorer: Scorer, recipe: Recipe, models: list[Path] | None = None, output: Path | None = None
) -> dict[str, Any]:
    """Rows of scores (the recipe's merge, a greedy soup's selection included, the mixture of
    experts of a ``moe:`` recipe, or each folder of ``models``, as Ray tasks with the scorer's
    Ray executor), also written as JSON to ``output`` when given; ``executor`` says which node
    did what where Ray ran any."""
    results: list[tuple[str, Evaluation]] = (
        list(zip(map(str, models), scorer.each("folder", [(m,) for m in models]), strict=True))
        if models
        else [(recipe.merge_method or "moe", score_recipe(scorer, recipe))]
    )
    rows = [
        {"model": label, "tasks": r.tasks, "score": r.score, **r.details} for label, r in results
    ]
    data = {"metric": scorer.metric, "higher_is_better": scorer.higher_is_better, "rows": rows}
    scorer.record_placements(data)
    if output is not None:
        from mergecli.engine.output import output_errors

        with output_errors(output.resolve()):
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(strict_json(data)[0] + "\n")
    return data
