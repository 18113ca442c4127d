"""Recipe parameter values and their resolution for one tensor.

A value is, as in mergekit, one of
- a scalar (number, string or boolean);
- a list of numbers: a gradient interpolated linearly over the depth of the tensor
  (``mergecli.layers.layer_position``), the list's points spread evenly from 0 to 1;
- a list of ``{filter: substring, value: ...}``: the first entry whose filter occurs in the
  tensor name applies, an entry without ``filter`` is the fallback; its value may be a gradient.
  Under ``conventions: mergekit`` the first entry that matches, has no filter or has filter
  ``"*"`` applies, wherever it sits in the list (mergekit 0.1.5's rule).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergecli.errors import RecipeError


def check_value(raw: Any, key: str, source: str | None = None) -> None:
    """Raise RecipeError when ``raw`` is not a valid parameter value; ``key`` names it in the
    recipe, and messages start with ``source`` (the recipe file) when given."""
    at = f"{source}: " if source else ""
    if isinstance(raw, bool | int | float | str):
        return
    if isinstance(raw, list) and raw:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            return
        if all(isinstance(v, dict) for v in raw):
            for i, entry in enumerate(raw):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise RecipeError(
                        f"{at}{key}[{i}]: a filtered value needs the keys 'filter' (optional) "
                        f"and 'value', got {sorted(entry)}",
                        key=f"{key}[{i}]",
                    )
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise RecipeError(
                        f"{at}{key}[{i}].filter: must be a string", key=f"{key}[{i}].filter"
                    )
                check_value(entry["value"], f"{key}[{i}].value", source)
            return
    raise RecipeError(
        f"{at}{key}: expected a number, a string, a list of numbers (gradient over layers) or a "
        f"list of {{filter, value}}, got {raw!r}",
        key=key,
    )


def resolve_value(
    raw: Any, tensor_name: str, position: float, conventions: str = "mergecli"
) -> Any:
    """The scalar value of a (checked) parameter value for one tensor; None if no filter matches."""
    if not isinstance(raw, list):
        return raw
    if isinstance(raw[0], dict) and conventions == "mergekit":
        for entry in raw:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return resolve_value(entry["value"], tensor_name, position, conventions)
        return None
    if isinstance(raw[0], dict):
        fallback = None
        for entry in raw:
            pattern = entry.get("filter")
            if pattern is None:
                if fallback is None:
                    fallback = entry
            elif pattern in tensor_name:
                return resolve_value(entry["value"], tensor_name, position)
        return None if fallback is None else resolve_value(fallback["value"], tensor_name, position)
    if len(raw) == 1:
        return float(raw[0])
    points = np.linspace(0.0, 1.0, len(raw))
    return float(np.interp(position, points, np.asarray(raw, dtype=np.float64)))
