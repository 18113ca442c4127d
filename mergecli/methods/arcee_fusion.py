"""Arcee Fusion: take an expert's entries where they differ from the base in importance."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import IGNORED_WEIGHT, Params, merge_method
from mergecli.methods.result import Merged, kept_fraction

QUANTILES = (0.25, 0.5, 0.75)


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """abs(θ1 − θ0) · KL(softmax θ1 ‖ softmax θ0) of each row (last dimension; +1e-8 to both)."""
    p = torch.softmax(expert, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (expert - base).abs() * kl


def fusion_threshold(scores: torch.Tensor, mergekit: bool = False) -> float:
    """median + 1.5·(q3 − q1) with quantile q the sorted score at index ⌊q·(n − 1)⌋; in float64,
    or (``mergekit``) rounded to the scores' dtype after each step, as mergekit computes it."""
    ordered = scores.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in QUANTILES)
    if mergekit:
        return float(median + 1.5 * (q3 - q1))
    return float(median) + 1.5 * (float(q3) - float(q1))


@merge_method(
    "arcee_fusion",
    "Arcee Fusion: importance s = abs(θ1 − θ0) · KL(softmax θ1 ‖ softmax θ0) per row; "
    "θ = θ0 + [s ≥ median(s) + 1.5·IQR(s)] ⊙ (θ1 − θ0)",
    min_models=1,
    max_models=1,
    convention="Quantiles are exact (mergekit 0.1.5 samples a million entries with replacement "
    "from larger tensors); the base model and the one expert are the two models.",
    ignored=IGNORED_WEIGHT,
    mergekit_compute="dtype",
)
def arcee_fusion(inputs: TensorInputs, p: Params) -> Merged:
    assert inputs.base is not None
    (expert,) = inputs.weights()
    scores = importance(expert, inputs.base)
    threshold = fusion_threshold(scores, p["conventions"] == "mergekit")
    mask = (scores >= threshold).to(expert.dtype)
    return Merged(inputs.base + (expert - inputs.base) * mask, [kept_fraction(mask)])
