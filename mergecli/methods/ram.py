"""RAM: Reinforced Agent Merging, and its tensor-local RAM+ variant."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import IGNORED_WEIGHT, Param, Params, merge_method

EPSILON = Param("epsilon", 1e-5, help="entries with abs(τt) ≤ ε do not contribute")


def contributions(inputs: TensorInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The task vectors (zero where abs ≤ ε) and how many experts contribute to each entry."""
    tvs = torch.stack(inputs.task_vectors())
    active = tvs.abs() > epsilon
    for t in range(tvs.shape[0]):
        inputs.kept[t] = float(active[t].float().mean())
    return tvs * active, active.sum(0)


@merge_method(
    "ram",
    "RAM: entries only one expert changes (abs τt > ε) are kept whole, shared entries are "
    "averaged over the experts that change them; θ = θ0 + Σt τt·[abs τt > ε] / max(nt, 1)",
    params=(EPSILON,),
    elementwise=True,
    ignored=IGNORED_WEIGHT,
)
def ram(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tvs, counts = contributions(inputs, p["epsilon"])
    assert inputs.base is not None
    return inputs.base + tvs.sum(0) / counts.clamp(min=1)


@merge_method(
    "ramplus_tl",
    "RAM+ (tensor-local): as ram, with each expert's unique entries scaled by "
    "1 + r·clamp(ρt, 0, α), ρt = its shared / its unique contributing entries in the tensor",
    params=(
        Param("r", 0.1, help="rescaling strength r"),
        Param("alpha", 0.2, help="upper clamp α of ρt"),
        EPSILON,
    ),
    convention="ρt is counted per tensor (the paper counts over the whole model), its "
    "denominator clamped to ε (mergekit 0.1.5).",
    ignored=IGNORED_WEIGHT,
)
def ramplus_tl(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tvs, counts = contributions(inputs, p["epsilon"])
    active = tvs != 0
    unique, shared = counts == 1, counts > 1
    n_shared = (active & shared).reshape(len(tvs), -1).sum(1).to(tvs.dtype)
    n_unique = (active & unique).reshape(len(tvs), -1).sum(1).to(tvs.dtype)
    rho = n_shared / n_unique.clamp(min=p["epsilon"])
    scale = 1 + p["r"] * rho.clamp(0, p["alpha"])
    shape = (-1,) + (1,) * (tvs.dim() - 1)
    merged = (tvs * unique * scale.reshape(shape)).sum(0) + (tvs * shared).sum(0) / counts.clamp(
        min=1
    )
    assert inputs.base is not None
    return inputs.base + merged
