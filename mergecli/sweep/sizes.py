"""Accuracy against deployed size (Figure 3 of the FlexMerge paper).

Each size is an artifact folder that rebuilds one model per task; every evaluation task is
scored on its own task's model (``Scorer.artifact``). The score of a size is the mean over
tasks; the experts' mean on their own tasks is the reference it approaches at M×. The gain from
1× to 2× (when both sizes are targets) is the score at 2× minus the score at 1×.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergecli.evaluate import Scorer
from mergecli.jsonsafe import strict_json
from mergecli.recipe import Recipe

if TYPE_CHECKING:
    from mergecli.flex import FlexResult

SCORES = "flex_scores"
"""Stem of the scores' JSON and figure written into a FlexMerge output."""


def score_sizes(
    recipe: Recipe, scorer: Scorer, sizes: list[tuple[float, float, Path]]
) -> dict[str, Any]:
    """Scores of (target, deployed size, artifact folder) triples, and the experts'."""
    handle = scorer.bar.add("scoring sizes", len(sizes))
    rows: list[dict[str, Any]] = []
    results = scorer.each("artifact", [(folder,) for _, _, folder in sizes])
    for (target, size, folder), result in zip(sizes, results, strict=True):
        rows.append(
            {
                "target": target,
                "size": size,
                "folder": str(folder),
                "tasks": result.tasks,
                "score": result.score,
            }
        )
        scorer.bar.advance(handle)
    scorer.bar.done(handle)
    experts = scorer.expert_scores(recipe)
    by_target = {r["target"]: r["score"] for r in rows}
    table = {
        "method": recipe.merge_method,
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "tasks": [t.name for t in scorer.tasks],
        "sizes": rows,
        "experts": experts,
        "expert_score": sum(experts.values()) / len(experts) if experts else None,
        "gain_1x_2x": by_target[2.0] - by_target[1.0] if {1.0, 2.0} <= set(by_target) else None,
    }
    return scorer.record_placements(table)


def score_flex(recipe: Recipe, scorer: Scorer, result: FlexResult) -> dict[str, Any]:
    """``score_sizes`` of every size ``run_flex`` wrote, also written as flex_scores.json and
    flex_scores.png in its output folder (listed under ``files``)."""
    from mergecli.sweep.plots import sizes_figure

    scores = score_sizes(recipe, scorer, [(r.target, r.size, r.folder) for r in result.results])
    json_path, png_path = result.output / f"{SCORES}.json", result.output / f"{SCORES}.png"
    sizes_figure(scores, png_path)
    scores["files"] = [str(json_path), str(png_path)]
    json_path.write_text(strict_json(scores)[0] + "\n")
    return scores
