"""The parameters of one tensor of a slices merge: per source, per slice, per recipe."""

from __future__ import annotations

from typing import Any

from mergecli.engine.slice_inputs import Slice
from mergecli.errors import RecipeError
from mergecli.methods import REQUIRED, MethodSpec, Param, Params
from mergecli.params import resolve_value
from mergecli.recipe import Recipe


def slice_params(
    recipe: Recipe,
    method: MethodSpec,
    part: Slice,
    name: str,
    stored: list[str],
    position: float,
) -> Params:
    """One output tensor's parameters: per model, the source's value, else the slice's, else
    the recipe's (the first whose filters match, evaluated at ``position``), else the default;
    a per-model value's filters see the source's tensor name, the others the output's."""
    at = f"slices[{part.index}]"
    shared = [(part.definition.parameters, f"{at}.parameters"), (recipe.parameters, "parameters")]
    offset = 1 if part.has_base else 0
    out: Params = {}
    for param in method.params:
        if not param.per_model:
            out[param.name] = lookup(recipe, method, param, shared, name, position)
            continue
        out[param.name] = [
            lookup(
                recipe,
                method,
                param,
                [(e.parameters, f"{at}.sources[{e.source}].parameters"), *shared],
                stored[offset + k],
                position,
            )
            for k, e in enumerate(part.experts)
        ]
    out["conventions"] = recipe.conventions
    return out


def lookup(
    recipe: Recipe,
    method: MethodSpec,
    param: Param,
    levels: list[tuple[dict[str, Any], str]],
    tensor: str,
    position: float,
) -> Any:
    """The first value of ``param`` in ``levels`` that applies to ``tensor``, else its default."""
    for values, where in levels:
        if param.name in values:
            raw = resolve_value(values[param.name], tensor, position, recipe.conventions)
            if raw is not None and raw is not REQUIRED:
                return param.coerce(raw, f"{where}.{param.name}")
    if param.required:
        key = f"{levels[0][1]}.{param.name}"
        raise RecipeError(f"{key}: '{method.name}' needs '{param.name}' (for {tensor})", key=key)
    return param.default_for(recipe.conventions)
