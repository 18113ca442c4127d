"""Interpolation on the hypersphere: NuSLERP, multi-SLERP and the Karcher mean.

Definitions follow mergekit 0.1.5 (NuSLERP and multi-SLERP have no paper; the Karcher mean is
the Riemannian centre of mass on the unit sphere, rescaled by the weighted mean norm).
"""

from __future__ import annotations

import torch

from mergecli.errors import ShapeError
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import WEIGHT
from mergecli.methods.registry import (
    AT_LEAST_ONE,
    IGNORED_WEIGHT,
    NON_NEGATIVE,
    Param,
    Params,
    merge_method,
)

NUSLERP_EPS = 1e-8


def nuslerp_pair(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool):
    """Slerp of a and b at t along vectors: the flattened tensors (flatten), its columns
    (row_wise) or its rows; vectors with 1 − cos² ≤ 1e-16 are interpolated linearly."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    "NuSLERP: slerp of two models (or of their task vectors, with a base) at t = w2/(w1+w2), "
    "along the flattened tensor, its rows or its columns",
    params=(
        WEIGHT,
        Param("nuslerp_row_wise", False, bool, "slerp each column (vectors along dimension 0)"),
        Param("nuslerp_flatten", True, bool, "slerp the whole flattened tensor"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    convention="abs(w1 + w2) < 1e-6 gives t = 0.5; norms clamped to 1e-7; vectors with "
    "1 − cos² ≤ 1e-16 are interpolated linearly (mergekit 0.1.5).",
    mergekit_compute="dtype",
)
def nuslerp(inputs: TensorInputs, p: Params) -> torch.Tensor:
    w = p["weight"]
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    flags = p["nuslerp_row_wise"], p["nuslerp_flatten"]
    if inputs.base is None:
        a, b = inputs.weights()
        return nuslerp_pair(t, a, b, *flags)
    a, b = inputs.task_vectors()
    return inputs.base + nuslerp_pair(t, a, b, *flags)


@merge_method(
    "multislerp",
    "Multi-SLERP: project the (flattened) models or task vectors onto the unit sphere, map "
    "them to the tangent space at their weighted mean direction, average there, map back and "
    "scale by the weighted mean norm",
    params=(
        WEIGHT,
        Param("normalize_weights", True, bool, "divide the weights by their sum"),
        Param("eps", 1e-8, help="added to norms", bounds=NON_NEGATIVE),
    ),
    base="optional",
    convention="One model is returned as is; a weighted mean direction of norm < eps falls back "
    "to the weighted sum for two models and is an error otherwise (mergekit 0.1.5).",
    mergekit_compute="dtype",
)
def multislerp(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tensors = inputs.task_vectors() if inputs.base is not None else inputs.weights()
    offset = inputs.base if inputs.base is not None else 0
    if len(tensors) == 1:
        return tensors[0] + offset
    eps = p["eps"]
    flat = torch.stack([x.reshape(-1) for x in tensors])
    w = torch.tensor(p["weight"], dtype=flat.dtype, device=flat.device)
    if p["normalize_weights"]:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            return (tensors[0] * w[0] + tensors[1] * w[1]) + offset
        raise ShapeError(
            f"{inputs.name}: multislerp's weighted mean direction is zero (antipodal models "
            "with balancing weights); change the weights",
            tensor=inputs.name,
        )
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w[:, None]).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = result * (norms.squeeze(-1) * w).sum()
    return result.reshape(tensors[0].shape) + offset


def norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``x``, in float32 for half precision (mergekit's conventions: mergekit
    takes Karcher norms in float32 while the directions stay in the tensors' dtype)."""
    return torch.linalg.vector_norm(x if x.dtype in (torch.float32, torch.float64) else x.float())


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equal-weight Karcher mean of the directions, scaled by the mean norm.

    Directions of norm ≤ tol are left out of the mean (their norm still counts in the scale);
    the start is the normalized Euclidean mean of the directions (the first one when that is
    below tol); each step moves along the mean of the log maps, stopping when its norm is
    below tol.
    """
    alpha = 1.0 / len(tensors)
    norms = [norm(x) for x in tensors]
    units = [
        x / n if n.item() > 0 else torch.zeros_like(x) for x, n in zip(tensors, norms, strict=True)
    ]
    valid = [u for u, n in zip(units, norms, strict=True) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    share = 1.0 / len(valid)
    mean = sum((share * u for u in valid[1:]), share * valid[0])
    mean_norm = norm(mean)
    mean = valid[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in valid:
            dot = torch.dot(mean.reshape(-1), u.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (u - dot * mean)
        length = norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * n for n in norms) * mean


@merge_method(
    "karcher",
    "Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere "
    "(fixed-point iteration of the mean log map), scaled by the models' mean norm",
    params=(
        Param("max_iter", 10, int, "iterations of the fixed point at most", bounds=AT_LEAST_ONE),
        Param(
            "tol",
            1e-5,
            help="stop when the mean log map is shorter; ignore norms below it",
            bounds=NON_NEGATIVE,
        ),
    ),
    base="optional",
    convention="Per tensor, flattened, equal weights; the base model only supplies layout and "
    "config.",
    mergekit="the base model, when given, is one of the averaged models (mergekit adds it to "
    "the inputs)",
    ignored=IGNORED_WEIGHT,
    mergekit_compute="dtype",
)
def karcher(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tensors = inputs.weights()
    if p["conventions"] == "mergekit" and inputs.base is not None:
        tensors = [*tensors, inputs.base]
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, p["max_iter"], p["tol"])
