"""DELLA-merging: magnitude-ranked drop probabilities, then TIES election and disjoint mean."""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods import mergekit
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import LAMBDA, WEIGHT, weighted_sum
from mergecli.methods.registry import FRACTION, NON_NEGATIVE, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged, kept_fraction
from mergecli.methods.sparsify import disjoint_merge, elect_sign
from mergecli.methods.ties import MERGEKIT_CONSENSUS, MERGEKIT_IGNORED, NORMALIZE, mergekit_combine

DENSITY = Param(
    "density", 0.5, help="mean keep probability", per_model=True, mergekit=1.0, bounds=FRACTION
)
EPSILON = Param(
    "epsilon",
    0.1,
    help="spread ε of the keep probabilities",
    per_model=True,
    mergekit=0.15,
    bounds=NON_NEGATIVE,
)

RESCALE = Param(
    "rescale",
    True,
    bool,
    "rescale kept entries: ÷ p (mergecli), to the task vector's L1 norm "
    "(conventions: mergekit); false keeps them as they are",
)


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
    inputs: TensorInputs,
    t: int,
    tv: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = True,
) -> tuple[torch.Tensor, float]:
    """mt ⊙ τt / p (rescale) or mt ⊙ τt, with mt ~ Bernoulli(p) a Philox mask keyed by (seed,
    expert, tensor) and drawn by entry index (mergecli's convention); and the fraction it
    keeps."""
    probability = keep_probabilities(tv, density, epsilon)
    mask = inputs.philox_mask(t, probability)
    kept = tv * mask
    return (kept / probability.to(tv.dtype) if rescale else kept), kept_fraction(mask)


def della_sparse(inputs: TensorInputs, p: Params) -> tuple[list[torch.Tensor], Kept]:
    """The dropped and rescaled task vectors under the recipe's conventions, and the fraction
    of entries each one's mask keeps."""
    tvs = inputs.task_vectors()
    out: list[torch.Tensor] = []
    kept: Kept = []
    for t, tv in enumerate(tvs):
        d, e = p["density"][t], p["epsilon"][t]
        if p["conventions"] != "mergekit":
            x, k = della_drop(inputs, t, tv, d, e, p["rescale"])
        elif d >= 1:
            x, k = tv, 1.0
        elif d <= 0:
            x, k = torch.zeros_like(tv), 0.0
        else:
            x, k = mergekit.bernoulli(inputs, t, tv, keep_probabilities(tv, d, e), p["rescale"])
        out.append(x)
        kept.append(k)
    return out, kept


def check_della(p: Params, name: str) -> None:
    if p["conventions"] == "mergekit":
        for t, (d, e) in enumerate(zip(p["density"], p["epsilon"], strict=True)):
            if 0 < d < 1 and not (d + e < 1 and d - e > 0):
                raise RecipeError(
                    f"models[{t}]: della needs density ± epsilon in (0, 1) (got density {d}, "
                    f"epsilon {e} for '{name}')",
                    key=f"models[{t}].parameters.epsilon",
                )
        return
    for t, (d, e) in enumerate(zip(p["density"], p["epsilon"], strict=True)):
        if not (e >= 0 and d - e > 0 and d + e <= 1):
            raise RecipeError(
                f"models[{t}]: della needs epsilon ≥ 0 and 0 < density ± epsilon ≤ 1 "
                f"(got density {d}, epsilon {e} for '{name}')",
                key=f"models[{t}].parameters",
            )


@merge_method(
    "della",
    "DELLA: per row keep entries with probability (density−ε) + 2ε·rank/(n−1) by magnitude "
    "rank, rescale kept entries by 1/p, then TIES election and disjoint mean; θ = θ0 + λ τm",
    params=(
        WEIGHT,
        DENSITY,
        EPSILON,
        LAMBDA,
        NORMALIZE,
        RESCALE,
    ),
    check=check_della,
    ignored=MERGEKIT_IGNORED,
    convention=(
        "Rows are the first dimension of a tensor (a 1-D tensor is one row), rank 0 is the "
        "smallest magnitude and equal magnitudes rank by position (mergekit's sort leaves "
        "their order unspecified); a one-entry row keeps with probability density. Masks are "
        "Philox4x32-10 draws keyed by (seed, expert index, tensor name) per entry index "
        "(conventions: mergekit: a CPU torch.rand stream with that key). Kept "
        "entries are divided by their own p (mergekit rescales to the tensor's L1 norm "
        "instead). Election on the unweighted rescaled vectors, zero sum → +1; mean over the "
        "agreeing experts weighted by wt (normalize: false sums them)."
    ),
    mergekit="rescale keeps each task vector's L1 norm (whole tensor) instead of ÷ p; "
    "density ≥ 1 keeps everything; " + MERGEKIT_CONSENSUS,
    mergekit_compute="dtype",
)
def della(inputs: TensorInputs, p: Params) -> Merged:
    dropped, _ = della_sparse(inputs, p)
    if p["conventions"] == "mergekit":
        return mergekit_combine(inputs, dropped, p)
    merge_func = "mean" if p["normalize"] else "sum"
    merged = disjoint_merge(dropped, p["weight"], elect_sign(dropped, "mass"), merge_func)
    assert inputs.base is not None
    return Merged(inputs.base + p["lambda"] * merged.value, merged.kept)


@merge_method(
    "della_linear",
    "DELLA's magnitude-ranked drop and rescale, then task arithmetic: θ = θ0 + λ Σ wt τ̃t "
    "(normalize: ÷ Σ wt)",
    params=(
        WEIGHT,
        DENSITY,
        EPSILON,
        LAMBDA,
        Param("normalize", False, bool, "divide the sum by Σ wt"),
        RESCALE,
    ),
    check=check_della,
    ignored=MERGEKIT_IGNORED,
    convention="Drop probabilities, masks and rescaling as in della; no sign election.",
    mergekit="rescale keeps each task vector's L1 norm (whole tensor) instead of ÷ p; "
    "density ≥ 1 keeps everything; abs(Σ wt) < 1e-8 is not divided by",
    mergekit_compute="dtype",
)
def della_linear(inputs: TensorInputs, p: Params) -> Merged:
    dropped, kept = della_sparse(inputs, p)
    if p["conventions"] == "mergekit":
        return mergekit.combine(
            inputs,
            dropped,
            p["weight"],
            consensus=None,
            normalize=p["normalize"],
            lam=p["lambda"],
            kept=kept,
        )
    merged = weighted_sum(dropped, p["weight"], p["normalize"], inputs.name)
    assert inputs.base is not None
    return Merged(inputs.base + p["lambda"] * merged, kept)
