"""NearSwap: move the base towards an expert only where the two are already close."""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import (
    IGNORED_WEIGHT,
    NON_NEGATIVE,
    REQUIRED,
    Param,
    Params,
    merge_method,
)


def check_t(p: Params, name: str) -> None:
    if p["t"] < 0:
        raise RecipeError(
            f"parameters.t: nearswap needs t ≥ 0, got {p['t']} for '{name}'", key="parameters.t"
        )


@merge_method(
    "nearswap",
    "NearSwap: w = clamp(t / abs(θ1 − θ0), 0, 1) per entry; θ = w θ1 + (1 − w) θ0",
    params=(
        Param(
            "t",
            REQUIRED,
            help="distance below which the expert's value is taken",
            bounds=NON_NEGATIVE,
        ),
    ),
    min_models=1,
    max_models=1,
    check=check_t,
    elementwise=True,
    convention="abs(θ1 − θ0) is clamped to 1e-6 (mergekit 0.1.5); the base model and the one "
    "expert are the two models.",
    ignored=IGNORED_WEIGHT,
    mergekit_compute="dtype",
)
def nearswap(inputs: TensorInputs, p: Params) -> torch.Tensor:
    assert inputs.base is not None
    (expert,) = inputs.weights()
    w = (p["t"] / (expert - inputs.base).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * expert + (1 - w) * inputs.base
