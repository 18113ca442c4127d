"""Model Stock: average the experts, then interpolate towards the base by their geometry."""

from __future__ import annotations

import itertools

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Params, merge_method
from mergecli.ops import cosine64


def stock_ratio(tvs: list[torch.Tensor]) -> float:
    """s = M c / (1 + (M−1) c), c the mean pairwise cosine of the task vectors (0 when the
    denominator is 0)."""
    m = len(tvs)
    pairs = list(itertools.combinations(tvs, 2))
    c = sum(cosine64(a, b) for a, b in pairs) / len(pairs)
    denominator = 1 + (m - 1) * c
    return m * c / denominator if denominator != 0 else 0.0


@merge_method(
    "model_stock",
    "Model Stock: per tensor c = mean pairwise cosine of the τt, s = Mc/(1+(M−1)c); "
    "θ = s·mean(θt) + (1−s)·θ0",
    min_models=2,
    convention=(
        "The Model Stock paper's formula, per tensor (mergekit takes cosines per row); a zero "
        "task vector has cosine 0 with every other; s = 0 (the base) if 1+(M−1)c = 0."
    ),
)
def model_stock(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tvs = inputs.task_vectors()
    mean = torch.stack(tvs).mean(0)
    assert inputs.base is not None
    return inputs.base + stock_ratio(tvs) * mean
