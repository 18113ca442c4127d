"""The two conventions a recipe can follow: mergecli's (the papers') and mergekit 0.1.5's.

``conventions: mergekit`` reproduces mergekit 0.1.5 for every method both tools have: its
parameter defaults (``Param.mergekit``), each method's behaviour (``MethodSpec.mergekit``), a
base model listed under ``models`` dropped from the experts, its filter-list rules
(``mergecli.params``), its gradient positions (``mergekit_position``), its output dtype
(``dtype`` when ``out_dtype`` is unset) and its compute dtype per method
(``MethodSpec.mergekit_compute``, ``mergecli.engine.plan.compute_dtype_of``). Under mergecli's
conventions a recipe that leaves unset a parameter whose default differs gets one warning naming
them.
"""

from __future__ import annotations

from pathlib import Path

from mergecli.layers import layer_index, layer_position
from mergecli.methods.registry import SAME, MethodSpec, Param
from mergecli.recipe import Recipe

BEHAVIOUR = (
    (
        "base model listed under models (or among a slice's sources)",
        "an expert with τ = 0",
        "dropped from the experts",
    ),
    (
        "filter list",
        "the first matching filter applies; an entry without filter is the fallback",
        'the first entry that matches, has no filter or has filter "*" applies',
    ),
    (
        "gradient position",
        "layer l of L (of its slice) at l/(L−1) (one layer: 0); embeddings at 0, final norm "
        "and head at 1",
        "layer l of L (of its slice) at l/(L−1) (one layer: 1); every tensor outside the "
        "layers at 0",
    ),
    (
        "output dtype",
        "out_dtype, else the base model's dtype",
        "out_dtype, else dtype, else the base model's dtype",
    ),
)
"""Recipe-level differences: (what, mergecli, mergekit)."""


def mergekit_position(name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer l of L at l/(L−1) (1 for one layer), 0 outside."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def parameter_position(name: str, num_layers: int, conventions: str) -> float:
    """Where a tensor sits for parameter gradients under these conventions."""
    if conventions == "mergekit":
        return mergekit_position(name, num_layers)
    return layer_position(name, num_layers)


def differing_params(method: MethodSpec) -> list[Param]:
    """The method's parameters whose default differs between the two conventions."""
    return [p for p in method.params if p.mergekit is not SAME]


def unset_differing(recipe: Recipe, method: MethodSpec) -> list[Param]:
    """Differing parameters that the recipe leaves to the default for at least one model."""
    unset = []
    for param in differing_params(method):
        if param.name in recipe.parameters:
            continue
        if param.per_model and set_for_every_model(recipe, param.name):
            continue
        unset.append(param)
    return unset


def set_for_every_model(recipe: Recipe, name: str) -> bool:
    """Whether every expert has its own value of ``name`` (in a slices recipe: every source,
    or its slice)."""
    if recipe.slices:
        return all(
            name in part.parameters or all(name in s.parameters for s in part.sources)
            for part in recipe.slices
        )
    return all(name in m.parameters for m in recipe.models)


def defaults_warning(recipe: Recipe, method: MethodSpec) -> str | None:
    """The one warning of a mergecli-conventions recipe that relies on differing defaults."""
    if recipe.conventions == "mergekit":
        return None
    unset = unset_differing(recipe, method)
    if not unset:
        return None
    listed = ", ".join(f"{p.name} (mergecli {p.default}, mergekit {p.mergekit})" for p in unset)
    return (
        f"{method.name}: defaults that differ from mergekit apply to {listed}; set them in the "
        "recipe, or set conventions: mergekit to reproduce mergekit 0.1.5"
    )


def same_model(recipe: Recipe, a: str, b: str) -> bool:
    """Whether two recipe model references name the same model (text or resolved folder)."""
    if a == b:
        return True
    pa, pb = recipe.resolve_path(a), recipe.resolve_path(b)
    return pa.exists() and pb.exists() and Path(pa).resolve() == Path(pb).resolve()


def listed_base(recipe: Recipe) -> list[int]:
    """Indices of ``models`` entries that name the base model."""
    base = recipe.base_model
    if base is None:
        return []
    return [i for i, m in enumerate(recipe.models) if same_model(recipe, m.model, base)]


def apply_conventions(recipe: Recipe, method: MethodSpec) -> tuple[Recipe, list[str]]:
    """The recipe as the method runs it under its conventions, and the warnings to show.

    Under mergekit's conventions a base model also listed under ``models`` is dropped from the
    experts (methods that use a base); under mergecli's it stays an expert with τ = 0, with a
    warning, as does a recipe relying on defaults that differ.
    """
    notes = []
    listed = listed_base(recipe) if method.base != "unused" else []
    if listed and recipe.conventions == "mergekit":
        models = [m for i, m in enumerate(recipe.models) if i not in listed]
        recipe = recipe.model_copy(update={"models": models})
    elif listed:
        notes.append(
            f"models[{listed[0]}] is the base model: it counts as an expert with a zero task "
            "vector (conventions: mergekit drops it from the experts)"
        )
    warning = defaults_warning(recipe, method)
    if warning:
        notes.append(warning)
    return recipe, notes
