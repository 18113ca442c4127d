"""Sanity checks of a recipe against its method, before any tensor is read: parameter ranges
(from the method's ``Param.bounds``), weights that would make the merge the base or divide by
zero, and warnings for recipes that are legal but likely wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecli.errors import RecipeError
from mergecli.methods import MethodSpec, Params
from mergecli.recipe import Recipe
from mergecli.sources import Source


def numbers(raw: Any, key: str) -> list[tuple[float, str]]:
    """Every number in a (checked) parameter value, with its recipe key: a scalar, the points
    of a gradient, the values of filtered entries. A gradient interpolates between its points,
    so checking them checks every value a tensor can get."""
    if isinstance(raw, bool | str):
        return []
    if isinstance(raw, int | float):
        return [(raw, key)]
    out: list[tuple[float, str]] = []
    for i, entry in enumerate(raw):
        if isinstance(entry, dict):
            out += numbers(entry["value"], f"{key}[{i}].value")
        else:
            out += numbers(entry, f"{key}[{i}]")
    return out


def check_bounds(recipe: Recipe, method: MethodSpec) -> None:
    """Each value of a bounded parameter lies in its bounds (one line naming the key)."""
    for where, values, _ in recipe.parameter_places():
        for name, raw in values.items():
            param = method.param(name)
            if param is None or param.bounds is None:
                continue
            for value, key in numbers(raw, f"{where}.{name}"):
                param.check_bounds(value, key)


def check_weights(method: MethodSpec, merged: dict[str, Params]) -> list[str]:
    """Weights that are all zero: an error where the method divides by their sum, or where
    they make every merged tensor the base (the merge would do nothing); a warning where only
    some tensors get zero weights (a filter may mean it)."""
    if method.param("weight") is None or not merged:
        return []
    zero = [name for name, p in merged.items() if not any(p["weight"])]
    divides = [name for name in zero if merged[name].get("normalize")]
    key = "models[].parameters.weight"
    if divides:
        raise RecipeError(
            f"{key}: the weights of '{divides[0]}' are all 0, and '{method.name}' divides by "
            "their sum (normalize: true)",
            key=key,
        )
    if len(zero) == len(merged):
        raise RecipeError(
            f"{key}: every weight is 0, so '{method.name}' would return the base unchanged",
            key=key,
        )
    if zero:
        return [
            f"{key}: all weights are 0 for {len(zero)} tensors (e.g. {zero[0]}): "
            "those keep the base's values"
        ]
    return []


def model_warnings(recipe: Recipe) -> list[str]:
    """The base also listed as an expert, an expert listed twice, experts whose folders share
    a name (and the task names used instead)."""
    notes = []
    where = [_place(recipe, m.model, m.revision) for m in recipe.models]
    if recipe.base_model:
        base = _place(recipe, recipe.base_model, None)
        for i, place in enumerate(where):
            if place == base:
                notes.append(
                    f"models[{i}].model is also the base_model: it is merged as an expert whose "
                    "task vector is zero (it still counts in weights and means)"
                )
    for i, place in enumerate(where):
        first = where.index(place)
        if first < i:
            notes.append(
                f"models[{i}].model repeats models[{first}].model: that expert is merged twice "
                f"(as '{recipe.model_name(first)}' and '{recipe.model_name(i)}')"
            )
    folders = [Path(m.model.rstrip("/").split("@")[0]).name for m in recipe.models]
    for i, folder in enumerate(folders):
        first = folders.index(folder)
        if first < i and where[first] != where[i]:
            notes.append(
                f"models[{first}] and models[{i}] share the folder name '{folder}': their task "
                f"names are '{recipe.model_name(first)}' and '{recipe.model_name(i)}'"
            )
    for i, entry in enumerate(recipe.models):
        named = [m.name for m in recipe.models[:i]]
        if entry.name and entry.name in named:
            notes.append(
                f"models[{i}].name '{entry.name}' is also the name of "
                f"models[{named.index(entry.name)}]: it is called '{recipe.model_name(i)}'"
            )
    return notes


def _place(recipe: Recipe, value: str, revision: str | None) -> str:
    """Where a model is: its resolved folder, or its Hub id and revision."""
    path = recipe.resolve_path(value)
    return str(path.resolve()) if path.exists() else f"{value}@{revision or ''}"


def adapter_warnings(recipe: Recipe, base: Source | None, experts: list[Source]) -> list[str]:
    """Adapters whose ``base_model_name_or_path`` names another model than the recipe's base
    (same shapes, so the merge runs, but the adapter was trained on other weights)."""
    if base is None or not recipe.base_model:
        return []
    notes = []
    for i, expert in enumerate(experts):
        named = getattr(getattr(expert, "peft_config", None), "base_model_name_or_path", None)
        if not named or _same_model(recipe, named, base):
            continue
        notes.append(
            f"models[{i}].model: adapter trained on '{named}' "
            f"(adapter_config.json), but base_model is '{recipe.base_model}'"
        )
    return notes


def _same_model(recipe: Recipe, named: str, base: Source) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` is the base: the same text, Hub id
    (``origin``) or folder."""
    origin = getattr(base, "origin", None)
    if named.rstrip("/") in (recipe.base_model, origin):
        return True
    return any(
        candidate.exists() and candidate.resolve() == base.path.resolve()
        for candidate in (Path(named).expanduser(), recipe.resolve_path(named))
    )
