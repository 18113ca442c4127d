"""Model Stock: average the experts, then interpolate towards the base by their geometry."""

from __future__ import annotations

import itertools

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Param, Params, merge_method
from mergecli.ops import cosine64

SINGULAR = 1e-6
"""mergekit: norm products are clamped to this, and a denominator below it keeps the base."""


def stock_ratio(tvs: list[torch.Tensor]) -> float:
    """s = M c / (1 + (M−1) c), c the mean pairwise cosine of the task vectors (0 when the
    denominator is 0)."""
    m = len(tvs)
    pairs = list(itertools.combinations(tvs, 2))
    c = sum(cosine64(a, b) for a, b in pairs) / len(pairs)
    denominator = 1 + (m - 1) * c
    return m * c / denominator if denominator != 0 else 0.0


def stock_ratios(tvs: list[torch.Tensor], filter_wise: bool, mergekit: bool) -> torch.Tensor:
    """The ratio s per row (filter_wise: vectors along the last dimension, a 1-D tensor one
    row) or of the whole flattened tensor, shaped to broadcast against a task vector.

    mergekit's arithmetic: cosines divide by the norm product clamped to 1e-6 and are clamped
    to [−1, 1]; abs(denominator) < 1e-6 gives s = 0. Otherwise a zero vector has cosine 0 and
    only a zero denominator gives 0.
    """
    shape = tvs[0].shape
    if filter_wise:
        vectors = [tv.unsqueeze(0) if tv.dim() == 1 else tv for tv in tvs]
    else:
        vectors = [tv.reshape(-1) for tv in tvs]
    cosines = []
    for a, b in itertools.combinations(vectors, 2):
        norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
        dots = (a * b).sum(-1)
        if mergekit:
            cosines.append((dots / norms.clamp(min=SINGULAR)).clamp(-1, 1))
        else:
            cosines.append(torch.where(norms > 0, dots / norms.where(norms > 0, 1), 0))
    c = torch.stack(cosines).mean(0).unsqueeze(-1)
    m = len(tvs)
    denominator = 1 + (m - 1) * c
    singular = denominator.abs() < SINGULAR if mergekit else denominator == 0
    ratio = torch.where(singular, 0, m * c / denominator.where(~singular, 1))
    return ratio.reshape((*shape[:-1], 1)) if filter_wise else ratio.reshape(1)


@merge_method(
    "model_stock",
    "Model Stock: per tensor c = mean pairwise cosine of the τt, s = Mc/(1+(M−1)c); "
    "θ = s·mean(θt) + (1−s)·θ0",
    params=(
        Param(
            "filter_wise",
            False,
            bool,
            "one ratio per row (vectors along the last dimension) instead of per tensor",
        ),
    ),
    min_models=2,
    ignored={"weight": "model stock weighs the experts equally (mergekit ignores a weight too)"},
    convention=(
        "The Model Stock paper's formula, per tensor (filter_wise: per row, as mergekit's "
        "option); a zero task vector has cosine 0 with every other; s = 0 (the base) if "
        "1+(M−1)c = 0."
    ),
    mergekit="cosines divide by the norm product clamped to 1e-6; abs(1+(M−1)c) < 1e-6 keeps "
    "the base; θ = s·mean(θt) + (1−s)·θ0 as written, in the compute dtype",
    mergekit_compute="dtype",
)
def model_stock(inputs: TensorInputs, p: Params) -> torch.Tensor:
    assert inputs.base is not None
    mergekit = p["conventions"] == "mergekit"
    if mergekit:  # mergekit's form s·mean(θt) + (1−s)·θ0, each step rounded to the dtype
        experts = inputs.weights()  # before task_vectors(): θt exactly
        ratio = stock_ratios(inputs.task_vectors(), p["filter_wise"], True).to(experts[0].dtype)
        average = sum(experts[1:], experts[0]) / len(experts)
        return ratio * average + (1 - ratio) * inputs.base
    tvs = inputs.task_vectors()
    mean = torch.stack(tvs).mean(0)
    if not p["filter_wise"]:
        return inputs.base + stock_ratio(tvs) * mean
    ratio = stock_ratios(tvs, p["filter_wise"], False).to(mean.dtype)
    return inputs.base + ratio * mean
