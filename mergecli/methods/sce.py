"""SCE (FuseChat): select salient entries by variance, weight experts by energy, erase signs."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import INT8_MASK
from mergecli.methods.registry import FRACTION, IGNORED_WEIGHT, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged, kept_fraction


def variance_mask(tvs: torch.Tensor, topk: float) -> torch.Tensor:
    """1 on the top ⌊topk · (entries of nonzero variance)⌋ entries by variance across experts."""
    if topk >= 1:
        return torch.ones_like(tvs[0])
    var = tvs.var(0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.reshape(-1), k).indices] = 1
    return mask


@merge_method(
    "sce",
    "SCE: keep the select_topk fraction of entries with the largest variance across the τt, "
    "weight each τt by its mean square over their sum, elect γ = sign(Σ τt) and average the "
    "agreeing entries with those weights; θ = θ0 + τm",
    params=(
        Param(
            "select_topk",
            1.0,
            help="fraction of the entries of nonzero variance kept (1: all)",
            bounds=FRACTION,
        ),
    ),
    ignored={**INT8_MASK, **IGNORED_WEIGHT},
    convention="Weights ηt = mean(τt²)/Σs mean(τs²) (uniform when that sum < 1e-6) from the "
    "selected τt; a zero vote sum elects +1; the weighted sum is divided by the agreeing "
    "weights clamped to 1e-6 (mergekit 0.1.5; the FuseChat paper's Algorithm 1).",
    mergekit_compute="dtype",
)
def sce(inputs: TensorInputs, p: Params) -> Merged:
    tvs = torch.stack(inputs.task_vectors())
    tvs = tvs * variance_mask(tvs, p["select_topk"])
    gamma = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(tvs.dtype)
    agree = (tvs.sign() == gamma).to(tvs.dtype)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(1)
    total = float(energy.sum())
    eta = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(energy))
    shape = (-1,) + (1,) * (tvs.dim() - 1)
    weights = eta.reshape(shape) * agree
    kept: Kept = [kept_fraction(agree[t] * (tvs[t] != 0)) for t in range(tvs.shape[0])]
    merged = (tvs * weights).sum(0) / weights.sum(0).clamp(min=1e-6)
    assert inputs.base is not None
    return Merged(inputs.base + merged, kept)
