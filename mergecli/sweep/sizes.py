"""Accuracy against deployed size (Figure 3 of the FlexMerge paper).

Each size is an artifact folder that rebuilds one model per task; every evaluation task is
scored on its own task's model (``Scorer.artifact``). The score of a size is the mean over
tasks; the experts' mean on their own tasks is the reference it approaches at M×. The gain from
1× to 2× (when both sizes are targets) is the score at 2× minus the score at 1×. Nothing is
selected here; with a ``test`` scorer every size and the experts are also scored on the test
data (``test``, ``experts_test``, ``test_gain_1x_2x``), the numbers to report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecli.evaluate import Scorer
from mergecli.evaluate.protocol import protocol
from mergecli.recipe import Recipe


def score_sizes(
    recipe: Recipe,
    scorer: Scorer,
    sizes: list[tuple[float, float, Path]],
    test: Scorer | None = None,
) -> dict[str, Any]:
    """Scores of (target, deployed size, artifact folder) triples, and the experts'."""
    handle = scorer.bar.add("scoring sizes", len(sizes))
    rows = []
    for target, size, folder in sizes:
        result = scorer.artifact(folder)
        row = {
            "target": target,
            "size": size,
            "folder": str(folder),
            "tasks": result.tasks,
            "score": result.score,
        }
        if test is not None:
            on_test = test.artifact(folder)
            row["test"] = {"tasks": on_test.tasks, "score": on_test.score}
        rows.append(row)
        scorer.bar.advance(handle)
    scorer.bar.done(handle)
    experts = scorer.expert_scores(recipe)
    by_target = {r["target"]: r["score"] for r in rows}
    result = {
        "method": recipe.merge_method,
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "tasks": [t.name for t in scorer.tasks],
        "sizes": rows,
        "experts": experts,
        "expert_score": sum(experts.values()) / len(experts) if experts else None,
        "gain_1x_2x": _gain(by_target),
        "protocol": protocol(test),
    }
    if test is not None:
        experts_test = test.expert_scores(recipe)
        result["experts_test"] = experts_test
        result["expert_test_score"] = (
            sum(experts_test.values()) / len(experts_test) if experts_test else None
        )
        result["test_gain_1x_2x"] = _gain({r["target"]: r["test"]["score"] for r in rows})
    return result


def _gain(by_target: dict[float, float]) -> float | None:
    return by_target[2.0] - by_target[1.0] if {1.0, 2.0} <= set(by_target) else None
