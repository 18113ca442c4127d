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


def slerp_mergekit(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """mergekit 0.1.5's slerp of the flattened tensors: norms below eps count as 1, the cosine
    of the normalized vectors is clamped to [−1, 1], abs(cos) > 0.9995 interpolates linearly."""
    x, y = a.reshape(-1), b.reshape(-1)
    norm_a, norm_b = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = float(((x / norm_a) * (y / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > PARALLEL:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return a * (math.sin((1 - t) * theta) / math.sin(theta)) + b * (
        math.sin(t * theta) / math.sin(theta)
    )


@merge_method(
    "slerp",
    "Spherical interpolation of exactly two models at t (0: the first, 1: the second); with a "
    "base model the two task vectors are interpolated and added to θ0",
    params=(Param("t", 0.5, help="interpolation position", bounds=UNIT),),
    base="optional",
    min_models=2,
    max_models=2,
    mergekit_models=(1, 1),
    ignored={"weight": "slerp interpolates at t (mergekit ignores a weight too)"},
    convention=(
        "Per tensor, flattened; abs(cos) > 0.9995 or a zero vector → linear interpolation. "
        "A base model makes the endpoints the two experts' task vectors (list both experts "
        "under models)."
    ),
    mergekit="the endpoints are base_model (t = 0) and the one other model (t = 1), as weights; "
    "a norm below 1e-8 counts as 1 (a zero vector is interpolated spherically)",
)
def slerp(inputs: TensorInputs, p: Params) -> torch.Tensor:
    if p["conventions"] == "mergekit":
        assert inputs.base is not None
        (other,) = inputs.weights()
        return slerp_mergekit(inputs.base, other, p["t"])
    if inputs.base is None:
        a, b = inputs.weights()
        return slerp_pair(a, b, p["t"])
    a, b = inputs.task_vectors()
    return inputs.base + slerp_pair(a, b, p["t"])
