"""PCB-merging: parameter competition balancing within and across task vectors."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import LAMBDA
from mergecli.methods.registry import FRACTION, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged

TAIL = 1e-4
"""Fraction clipped at each end of the magnitudes (0.01%)."""


def clip_rows(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp each row to its values at sorted positions ⌊n·low⌋ and ⌊n(1−high) − 1⌋ (0-based,
    truncated towards zero as in the PCB reference code)."""
    n = x.shape[1]
    ordered = x.sort(dim=1).values
    lowest = ordered[:, min(int(n * low), n - 1)][:, None]
    return x.clamp(lowest, ordered[:, int(n * (1 - high) - 1)][:, None])


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(x − min) / (max − min) per row; 0 in a constant row."""
    low = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), 0)


def pcb_weights(tvs: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped task vectors and their balancing weights β, both M × n."""
    m = tvs.shape[0]
    magnitude = clip_rows(tvs.abs(), TAIL, TAIL)
    intra = torch.exp(m * minmax_rows(magnitude) ** 2)
    inter = torch.tanh(tvs * tvs.sum(0))
    weights = minmax_rows(clip_rows(intra * inter, 1 - ratio, 0))
    return torch.sign(tvs) * magnitude, weights


@merge_method(
    "pcb",
    "PCB: clip 0.01% magnitude tails, β = exp(M·N(abs τt)²) ⊙ tanh(τt ⊙ Σs τs), keep the top "
    "ratio of β per row weighted by its min–max value; τm = Σ βt τt / Σ βt; θ = θ0 + λ τm",
    params=(
        Param("ratio", 0.1, help="fraction of entries of each task vector kept", bounds=FRACTION),
        LAMBDA,
    ),
    convention=(
        "A row is one task vector's tensor, flattened (the PCB reference code flattens the "
        "whole model instead: here statistics are per tensor). Clip positions, the kept top "
        "ratio and the final division by max(Σ βt, 1e-12) follow the reference code: "
        "intra-balancing and the merge use the clipped τt, inter-balancing the unclipped "
        "ones. Min–max normalisation of a constant row gives 0."
    ),
)
def pcb(inputs: TensorInputs, p: Params) -> Merged:
    tvs = inputs.task_vectors()
    clipped, weights = pcb_weights(torch.stack([tv.reshape(-1) for tv in tvs]), p["ratio"])
    kept: Kept = [float((weights[t] > 0).sum()) / max(weights.shape[1], 1) for t in range(len(tvs))]
    merged = (clipped * weights).sum(0) / weights.sum(0).clamp_min(1e-12)
    assert inputs.base is not None
    return Merged(inputs.base + p["lambda"] * merged.reshape(inputs.base.shape), kept)
