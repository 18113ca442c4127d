"""Grids of recipe parameters: ``lambda=0.1:1.0:0.1`` (a range, both ends included) or
``density=0.1,0.2,0.3`` (a list); ``NAME.key=...`` sets a per-model parameter of one expert."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import yaml

from mergecli.errors import RecipeError, UnknownParameterError, did_you_mean
from mergecli.methods import get_method
from mergecli.recipe import Recipe

DIGITS = 10
"""Range values are rounded to this many decimals (0.1 + 2·0.1 is 0.3, not 0.30000000000000004)."""


def parse_values(text: str, where: str) -> list[Any]:
    """``start:stop:step`` (stop included when the steps reach it) or comma-separated values
    (numbers, true/false or words)."""
    if text.count(":") == 2:
        try:
            start, stop, step = (float(p) for p in text.split(":"))
        except ValueError:
            raise RecipeError(
                f"{where}: '{text}' is not start:stop:step with numbers", key="--grid"
            ) from None
        if step <= 0 or stop < start:
            raise RecipeError(f"{where}: '{text}' needs step > 0 and stop ≥ start", key="--grid")
        count = int((stop - start) / step + 1e-9) + 1
        values = [round(start + k * step, DIGITS) for k in range(count)]
        return [
            int(v) if all(float(x).is_integer() for x in text.split(":")) else v for v in values
        ]
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise RecipeError(f"{where}: empty value in '{text}'", key="--grid")
    return [yaml.safe_load(item) for item in items]


@dataclass(frozen=True)
class Axis:
    """One parameter of the grid: ``model`` is the expert's name for a per-model setting."""

    key: str
    values: list[Any]
    model: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model}.{self.key}" if self.model else self.key


def parse_grid(specs: list[str], recipe: Recipe) -> list[Axis]:
    """The axes of ``--grid`` options, checked against the recipe's method and experts."""
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    axes: list[Axis] = []
    for spec in specs:
        where = f"--grid {spec}"
        key, sep, text = spec.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"{where}: expected KEY=VALUES (lambda=0.1:1.0:0.1, density=0.2,0.5)", key="--grid"
            )
        model, _, key = key.strip().rpartition(".")
        if model and model not in names:
            raise RecipeError(
                f"{where}: no model is named '{model}'{did_you_mean(model, names)}", key="--grid"
            )
        axis = Axis(key, parse_values(text, where), model or None)
        if any(a.label == axis.label for a in axes):
            raise RecipeError(f"{where}: '{axis.label}' is given twice", key="--grid")
        axes.append(axis)
    for axis in axes:
        method = get_method(recipe.merge_method).resolve(
            {**recipe.parameters, **{a.key: a.values[0] for a in axes if a.model is None}}
        )
        param = method.param(axis.key)
        if param is None:
            raise UnknownParameterError(
                f"--grid {axis.label}: '{method.name}' has no parameter '{axis.key}'"
                f"{did_you_mean(axis.key, method.param_names)}; it takes: "
                f"{', '.join(method.param_names) or 'none'}",
                method=method.name,
                parameter=axis.key,
                key="--grid",
            )
        if axis.model and not param.per_model:
            raise RecipeError(
                f"--grid {axis.label}: '{axis.key}' applies to the whole merge", key="--grid"
            )
    return axes


def grid_points(axes: list[Axis]) -> list[dict[str, Any]]:
    """Every combination, the first axis varying slowest: {label: value}."""
    return [
        dict(zip((a.label for a in axes), values, strict=True))
        for values in itertools.product(*(a.values for a in axes))
    ]


def apply_point(recipe: Recipe, axes: list[Axis], point: dict[str, Any]) -> Recipe:
    """The recipe with one grid point's values. A whole-merge value of a per-model parameter
    replaces the experts' own values."""
    parameters = dict(recipe.parameters)
    models = [m.model_copy(deep=True) for m in recipe.models]
    names = [recipe.model_name(i) for i in range(len(models))]
    for axis in axes:
        value = point[axis.label]
        if axis.model is None:
            parameters[axis.key] = value
            for entry in models:
                entry.parameters.pop(axis.key, None)
    for axis in axes:
        if axis.model is not None:
            models[names.index(axis.model)].parameters[axis.key] = point[axis.label]
    return recipe.model_copy(update={"parameters": parameters, "models": models})
