"""Passthrough: one model's tensor, copied (optionally scaled): the method of stacked slices."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Param, Params, merge_method


@merge_method(
    "passthrough",
    "θ = scale · θ1: the one model's tensor unchanged (scale 1), for layer-stacking slices "
    "(frankenmerges, depth up-scaling)",
    params=(Param("scale", 1.0, help="factor applied to the tensor", per_model=True),),
    base="unused",
    min_models=1,
    max_models=1,
    convention="Exactly one model per slice (mergekit's rule); a base model only supplies config.",
    elementwise=True,
    mergekit_compute="dtype",
)
def passthrough(inputs: TensorInputs, p: Params) -> torch.Tensor:
    (weight,) = inputs.weights()
    scale = p["scale"][0]
    return weight if scale == 1 else weight * scale
