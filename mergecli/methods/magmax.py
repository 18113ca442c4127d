"""MagMax: per entry, the task vector entry of largest magnitude."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import LAMBDA
from mergecli.methods.registry import Params, merge_method
from mergecli.methods.result import Kept, Merged


@merge_method(
    "magmax",
    "MagMax: per entry take the τt of largest magnitude; θ = θ0 + λ τmax",
    params=(LAMBDA,),
    convention="Equal magnitudes take the expert listed first (lowest t).",
)
def magmax(inputs: TensorInputs, p: Params) -> Merged:
    stacked = torch.stack(inputs.task_vectors())
    choice = stacked.abs().argmax(0, keepdim=True)  # the first maximum on ties
    kept: Kept = [
        float((choice == t).sum()) / max(choice.numel(), 1) for t in range(stacked.shape[0])
    ]
    assert inputs.base is not None
    return Merged(inputs.base + p["lambda"] * stacked.gather(0, choice).squeeze(0), kept)
