"""Greedy soup (Wortsman et al., 2022), as the training-duration paper runs it.

The experts are sorted by their own validation score (each expert scored on every task, best
first; ties keep the recipe's order). The soup starts as the best expert; each next expert is
added when the uniform average of the soup with it scores strictly better than the soup
without it, and skipped otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergecli.evaluate.score import Evaluation
from mergecli.recipe import Recipe

if TYPE_CHECKING:
    from mergecli.evaluate.score import Scorer


def with_models(recipe: Recipe, indices: list[int]) -> Recipe:
    """The recipe listing only these experts (in this order), names kept."""
    models = [recipe.models[i].model_copy(update={"name": recipe.model_name(i)}) for i in indices]
    return recipe.model_copy(update={"models": models})


def greedy_soup(scorer: Scorer, recipe: Recipe) -> Evaluation:
    """Select the soup's experts; the result's ``recipe`` lists them and ``details`` records
    every step."""
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    experts = list(scorer.each("model", [(recipe.resolve_path(m.model),) for m in recipe.models]))
    order = sorted(
        range(len(experts)),
        key=lambda i: (-experts[i].score if scorer.higher_is_better else experts[i].score, i),
    )
    soup, current = [order[0]], experts[order[0]]
    steps = [{"expert": names[order[0]], "score": current.score, "kept": True}]
    for i in order[1:]:
        candidate = scorer.merge(with_models(recipe, [*soup, i]))
        kept = scorer.better(candidate.score, current.score)
        steps.append({"expert": names[i], "score": candidate.score, "kept": kept})
        if kept:
            soup, current = [*soup, i], candidate
    details = {
        "greedy_soup": {
            "expert_scores": {names[i]: experts[i].score for i in order},
            "steps": steps,
            "selected": [names[i] for i in soup],
        }
    }
    return Evaluation(current.tasks, with_models(recipe, soup), details)
