"""Merges whose method first selects experts by scoring candidate merges (greedy soup).

``plan_merge`` refuses such a method (it would merge every listed expert); these functions run
the selection with the recipe's ``evaluate:`` section first.
"""

from __future__ import annotations

from typing import Any

from mergecli.distributed.executor import LocalExecutor, RayExecutor
from mergecli.engine.plan import MergePlan, plan_merge
from mergecli.evaluate.greedy import greedy_soup
from mergecli.evaluate.score import Evaluation, Scorer
from mergecli.methods import get_method
from mergecli.progress import CountBar
from mergecli.recipe import Recipe


def score_recipe(scorer: Scorer, recipe: Recipe) -> Evaluation:
    """Scores of a recipe's merge; a selecting method selects its experts first, and the
    result's ``recipe`` lists the ones kept (``details`` records the selection). A recipe with
    a ``moe:`` section is scored as the mixture of experts it builds."""
    if recipe.moe is not None:
        return scorer.moe(recipe)
    if get_method(recipe.merge_method).selects_experts:
        return greedy_soup(scorer, recipe)
    return scorer.merge(recipe)


def plan_with_selection(
    recipe: Recipe,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    bar: CountBar | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
) -> tuple[MergePlan, dict[str, Any]]:
    """The merge plan of a recipe, its experts selected first when its method selects them
    (greedy_soup; the experts' scores as Ray tasks with a Ray executor); also the selection's
    record (empty for other methods)."""
    if not get_method(recipe.merge_method).selects_experts:
        return plan_merge(recipe, device=device, shard_size=shard_size), {}
    chosen = greedy_soup(Scorer(recipe, device, bar, executor), recipe)
    assert chosen.recipe is not None
    plan = plan_merge(chosen.recipe, device=device, shard_size=shard_size, experts_selected=True)
    return plan, chosen.details
