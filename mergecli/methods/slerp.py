"""Spherical linear interpolation of two models (or of their task vectors)."""

from __future__ import annotations

import math

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import UNIT, Param, Params, merge_method
from mergecli.ops import cosine64, sumsq64

PARALLEL = 0.9995
"""Above this abs(cosine) the two vectors are nearly parallel: interpolate linearly."""


def slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """sin((1−t)Ω)/sinΩ · a + sin(tΩ)/sinΩ · b, Ω the angle between the flattened a and b;
    linear interpolation when they are nearly parallel or one of them is zero."""
    cos = cosine64(a, b)
    if abs(cos) > PARALLEL or sumsq64(a) == 0 or sumsq64(b) == 0:
        return a * (1 - t) + b * t
    omega = math.acos(cos)
    return a * (math.sin((1 - t) * omega) / math.sin(omega)) + b * (
        math.sin(t * omega) / math.sin(omega)
    )


@merge_method(
    "slerp",
    "Spherical interpolation of exactly two models at t (0: the first, 1: the second); with a "
    "base model the two task vectors are interpolated and added to θ0",
    params=(Param("t", 0.5, help="interpolation position", bounds=UNIT),),
    base="optional",
    min_models=2,
    max_models=2,
    convention=(
        "Per tensor, flattened; abs(cos) > 0.9995 or a zero vector → linear interpolation. "
        "mergekit interpolates base_model's weights with the other model's; here a base model "
        "makes the endpoints the two experts' task vectors (list both experts under models)."
    ),
)
def slerp(inputs: TensorInputs, p: Params) -> torch.Tensor:
    if inputs.base is None:
        a, b = inputs.weights()
        return slerp_pair(a, b, p["t"])
    a, b = inputs.task_vectors()
    return inputs.base + slerp_pair(a, b, p["t"])
