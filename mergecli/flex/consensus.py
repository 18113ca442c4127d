"""``consensus`` in FlexMerge means the paper's CONSENSUS: TALL masks over a TIES merge.

The FlexMerge paper's CONSENSUS (its Table 1) stores θ0, τuni and one mask per task and rebuilds
task k as θ0 + τuni ⊙ mk, with τuni from TIES and λ = 0.6: that is ``tall_masks`` with
``use_ties: true``. mergecli's ``consensus`` method is Consensus Merging's one model (entries
kept where k masks agree), which the paper does not run. ``mergecli flex`` therefore runs
``merge_method: consensus`` as ``tall_masks`` (``use_ties`` true unless the recipe sets it),
with a warning; Consensus Merging's own parameters (``k``, ``alpha``) are refused.
"""

from __future__ import annotations

from mergecli.errors import RecipeError
from mergecli.recipe import Recipe

OWN = ("k", "alpha")
"""Parameters of Consensus Merging that the paper's CONSENSUS does not have."""
NOTE = (
    "merge_method consensus: FlexMerge runs the paper's CONSENSUS, tall_masks with use_ties: "
    "true (task k is θ0 + τuni ⊙ mk); Consensus Merging's one model is 'mergecli merge' with "
    "consensus"
)


def paper_consensus(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe FlexMerge runs for ``recipe`` and the warnings to show."""
    if recipe.merge_method != "consensus":
        return recipe, []
    places = [("parameters", recipe.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)
    ]
    for where, values in places:
        for key in OWN:
            if key in values:
                raise RecipeError(
                    f"{where}.{key}: in mergecli flex, consensus is the FlexMerge paper's "
                    "CONSENSUS (tall_masks with use_ties: true: one mask per task, no "
                    f"'{key}'); Consensus Merging's {key} is for 'mergecli merge'",
                    key=f"{where}.{key}",
                )
    parameters = {"use_ties": True, **recipe.parameters}
    return recipe.model_copy(update={"merge_method": "tall_masks", "parameters": parameters}), [
        NOTE
    ]
