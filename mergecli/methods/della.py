"""DELLA-merging: magnitude-ranked drop probabilities, then TIES election and disjoint mean."""

from __future__ import annotations

import torch

from mergecli.errors import MergeError
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import LAMBDA, WEIGHT
from mergecli.methods.registry import Param, Params, merge_method
from mergecli.methods.sparsify import disjoint_merge, elect_sign
from mergecli.methods.ties import MERGEKIT_IGNORED, NORMALIZE


def keep_probabilities(tv: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """pi = (density − ε) + 2ε · rank / (n − 1) per row, rank 0 = smallest abs (float64).

    Rows are the first dimension (a 1-D tensor is one row); equal magnitudes are ranked by
    position; a row of one entry keeps with probability density.
    """
    rows = tv.reshape(tv.shape[0] if tv.dim() > 1 else 1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full(tv.shape, density, dtype=torch.float64, device=tv.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=tv.device).expand_as(order))
    probability = (density - epsilon) + ranks.to(torch.float64) * (2 * epsilon / (n - 1))
    return probability.reshape(tv.shape)


def della_drop(
    inputs: TensorInputs, t: int, tv: torch.Tensor, density: float, epsilon: float
) -> torch.Tensor:
    """mt ⊙ τt / p with mt ~ Bernoulli(p), seeded per (seed, expert, tensor)."""
    probability = keep_probabilities(tv, density, epsilon)
    mask = inputs.bernoulli_mask(t, probability)
    return tv * mask / probability.to(tv.dtype)


def check_della(p: Params, name: str) -> None:
    for t, (d, e) in enumerate(zip(p["density"], p["epsilon"], strict=True)):
        if not (e >= 0 and d - e > 0 and d + e <= 1):
            raise MergeError(
                f"models[{t}]: della needs epsilon ≥ 0 and 0 < density ± epsilon ≤ 1 "
                f"(got density {d}, epsilon {e} for '{name}')"
            )


@merge_method(
    "della",
    "DELLA: per row keep entries with probability (density−ε) + 2ε·rank/(n−1) by magnitude "
    "rank, rescale kept entries by 1/p, then TIES election and disjoint mean; θ = θ0 + λ τm",
    params=(
        WEIGHT,
        Param("density", 0.5, help="mean keep probability", per_model=True),
        Param("epsilon", 0.1, help="spread ε of the keep probabilities", per_model=True),
        LAMBDA,
        NORMALIZE,
    ),
    check=check_della,
    ignored=MERGEKIT_IGNORED,
    convention=(
        "Rows are the first dimension of a tensor (a 1-D tensor is one row), rank 0 is the "
        "smallest magnitude and equal magnitudes rank by position (mergekit's sort leaves "
        "their order unspecified); a one-entry row keeps with probability density. Masks are "
        "Philox4x32-10 draws keyed by (seed, expert index, tensor name) per entry index. Kept "
        "entries are divided by their own p (mergekit rescales to the tensor's L1 norm "
        "instead). Election on the unweighted rescaled vectors, zero sum → +1; mean over the "
        "agreeing experts weighted by wt (normalize: false sums them)."
    ),
)
def della(inputs: TensorInputs, p: Params) -> torch.Tensor:
    dropped = [
        della_drop(inputs, t, tv, p["density"][t], p["epsilon"][t])
        for t, tv in enumerate(inputs.task_vectors())
    ]
    merge_func = "mean" if p["normalize"] else "sum"
    merged = disjoint_merge(inputs, dropped, p["weight"], elect_sign(dropped, "mass"), merge_func)
    assert inputs.base is not None
    return inputs.base + p["lambda"] * merged
