"""RAM: Reinforced Agent Merging, and its tensor-local RAM+ variant."""

from __future__ import annotations

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import IGNORED_WEIGHT, NON_NEGATIVE, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged, kept_fraction

EPSILON = Param(
    "epsilon", 1e-5, help="entries with abs(τt) ≤ ε do not contribute", bounds=NON_NEGATIVE
)


def contributions(inputs: TensorInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, Kept]:
    """The task vectors (zero where abs ≤ ε), how many experts contribute to each entry, and
    the fraction of its entries each expert contributes."""
    tvs = torch.stack(inputs.task_vectors())
    active = tvs.abs() > epsilon
    kept: Kept = [kept_fraction(active[t]) for t in range(tvs.shape[0])]
    return tvs * active, active.sum(0), kept


@merge_method(
    "ram",
    "RAM: entries only one expert changes (abs τt > ε) are kept whole, shared entries are "
    "averaged over the experts that change them; θ = θ0 + Σt τt·[abs τt > ε] / max(nt, 1)",
    params=(EPSILON,),
    elementwise=True,
    ignored=IGNORED_WEIGHT,
    mergekit_compute="dtype",
)
def ram(inputs: TensorInputs, p: Params) -> Merged:
    tvs, counts, kept = contributions(inputs, p["epsilon"])
    assert inputs.base is not None
    return Merged(inputs.base + tvs.sum(0) / counts.clamp(min=1), kept)


@merge_method(
    "ramplus_tl",
    "RAM+ (tensor-local): as ram, with each expert's unique entries scaled by "
    "1 + r·clamp(ρt, 0, α), ρt = its shared / its unique contributing entries in the tensor",
    params=(
        Param("r", 0.1, help="rescaling strength r", bounds=NON_NEGATIVE),
        Param("alpha", 0.2, help="upper clamp α of ρt", bounds=NON_NEGATIVE),
        EPSILON,
    ),
    convention="ρt is counted per tensor (the paper counts over the whole model), its "
    "denominator clamped to ε (mergekit 0.1.5); in half precision ρt, the scaled unique "
    "entries and the sum are float32, as mergekit's type promotion makes them.",
    ignored=IGNORED_WEIGHT,
    mergekit_compute="dtype",
)
def ramplus_tl(inputs: TensorInputs, p: Params) -> Merged:
    tvs, counts, kept = contributions(inputs, p["epsilon"])
    active = tvs != 0
    unique, shared = counts == 1, counts > 1
    wide = tvs.dtype if tvs.dtype.itemsize >= 4 else torch.float32  # counts never in half
    n_shared = (active & shared).reshape(len(tvs), -1).sum(1).to(wide)
    n_unique = (active & unique).reshape(len(tvs), -1).sum(1).to(wide)
    rho = n_shared / n_unique.clamp(min=p["epsilon"])
    scale = (1 + p["r"] * rho.clamp(0, p["alpha"])).reshape((-1,) + (1,) * (tvs.dim() - 1))
    assert inputs.base is not None
    if wide != tvs.dtype:  # half precision (mergekit's compute): as mergekit 0.1.5 promotes
        per_expert = (tvs * unique).to(wide) * scale + tvs * shared / counts.clamp(min=1)
        return Merged((inputs.base + per_expert.sum(0)).to(tvs.dtype), kept)  # one rounding
    merged = (tvs * unique * scale).sum(0) + (tvs * shared).sum(0) / counts.clamp(min=1)
    return Merged(inputs.base + merged, kept)
