"""Weight averaging and task arithmetic, with their DARE variant."""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods import mergekit
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import FRACTION, Param, Params, merge_method
from mergecli.methods.result import Merged
from mergecli.methods.sparsify import PHILOX_MASKS, dare_drop

WEIGHT = Param("weight", 1.0, help="per-model weight wt", per_model=True)
LAMBDA = Param("lambda", 1.0, help="scaling λ of the merged task vector")
INT8_MASK = {"int8_mask": "a mergekit memory option that mergecli does not need"}
MERGEKIT_SUM = (
    "the weighted sum is divided by Σ wt only when abs(Σ wt) ≥ 1e-8 (normalize), else left as is"
)


RESCALE_HELP = (
    "rescale kept entries: ÷ density (mergecli), to the task vector's L1 norm "
    "(conventions: mergekit)"
)


def weighted_sum(
    tensors: list[torch.Tensor], weights: list[float], normalize: bool, name: str
) -> torch.Tensor:
    """Σ wt xt, divided by Σ wt when normalize (an error when that sum is 0)."""
    total = normalizer(weights, normalize, name)
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x, alpha=w)
    if total is not None:
        out /= total
    return out


def normalizer(weights: list[float], normalize: bool, name: str) -> float | None:
    """Σ wt when normalize (an error when that sum is 0), else None."""
    if not normalize:
        return None
    total = sum(weights)
    if total == 0:
        raise RecipeError(
            f"{name}: the weights sum to 0, cannot normalize", key="parameters.weight"
        )
    return total


def linear_coefficients(p: Params) -> list[float] | None:
    """θ − θ0 = Σ (wt / Σ w) τt when normalized, Σ wt τt when Σ wt = 1, else not a combination."""
    total = sum(p["weight"])
    if p["normalize"] and total != 0:
        return [w / total for w in p["weight"]]
    return list(p["weight"]) if total == 1 else None


def task_arithmetic_coefficients(p: Params) -> list[float] | None:
    """λ wt, divided by Σ wt when normalize."""
    total = sum(p["weight"]) if p["normalize"] else 1.0
    return [p["lambda"] * w / total for w in p["weight"]] if total != 0 else None


@merge_method(
    "linear",
    "θ = Σ wt θt / Σ wt (weight averaging, model soup); normalize: false drops the division",
    params=(WEIGHT, Param("normalize", True, bool, "divide by Σ wt")),
    base="unused",
    convention="A base model, if given, only supplies config, tokenizer and non-float tensors.",
    elementwise=True,
    coefficients=linear_coefficients,
)
def linear(inputs: TensorInputs, p: Params) -> torch.Tensor:
    return weighted_sum(inputs.weights(), p["weight"], p["normalize"], inputs.name)


@merge_method(
    "greedy_soup",
    "Greedy soup: experts sorted by validation score, each kept only if the uniform average of "
    "the soup scores better; θ = the mean of the kept experts",
    base="unused",
    selects_experts=True,
    convention="Selection needs an evaluate: section (mergecli merge/sweep run it); "
    "the merge itself averages the experts the selection keeps.",
)
def greedy_soup(inputs: TensorInputs, p: Params) -> torch.Tensor:
    weights = inputs.weights()
    return weighted_sum(weights, [1.0] * len(weights), True, inputs.name)


@merge_method(
    "task_arithmetic",
    "θ = θ0 + λ Σ wt τt; normalize: true divides the sum by Σ wt",
    params=(WEIGHT, LAMBDA, Param("normalize", False, bool, "divide the sum by Σ wt")),
    elementwise=True,
    coefficients=task_arithmetic_coefficients,
    stored_inputs=lambda p: p["conventions"] != "mergekit",
    ignored=INT8_MASK,
    mergekit=MERGEKIT_SUM,
    mergekit_compute="dtype",
)
def task_arithmetic(inputs: TensorInputs, p: Params) -> torch.Tensor | Merged:
    if p["conventions"] == "mergekit":
        inputs.widen()
        return mergekit.combine(
            inputs,
            inputs.task_vectors(),
            p["weight"],
            consensus=None,
            normalize=p["normalize"],
            lam=p["lambda"],
        )
    from mergecli.methods.sum_kernel import task_arithmetic_sum  # numba, on first use

    total = normalizer(p["weight"], p["normalize"], inputs.name)
    fused = task_arithmetic_sum(inputs, p["weight"], total, p["lambda"])
    if fused is not None:
        return fused
    inputs.widen()
    merged = weighted_sum(inputs.task_vectors(), p["weight"], p["normalize"], inputs.name)
    assert inputs.base is not None
    return merged.mul_(p["lambda"]).add_(inputs.base)


@merge_method(
    "dare_linear",
    "DARE: τ̃t = mt ⊙ τt / density with mt ~ Bernoulli(density), then task arithmetic on τ̃",
    params=(
        WEIGHT,
        LAMBDA,
        Param(
            "density", 0.5, help="keep probability", per_model=True, mergekit=1.0, bounds=FRACTION
        ),
        Param("normalize", False, bool, "divide the sum by Σ wt"),
        Param("rescale", True, bool, RESCALE_HELP),
    ),
    convention=PHILOX_MASKS,
    elementwise=lambda p: p["conventions"] != "mergekit",
    ignored=INT8_MASK,
    mergekit=f"rescale keeps each task vector's L1 norm (whole tensor) instead of ÷ density; "
    f"density ≥ 1 keeps everything; {MERGEKIT_SUM}",
    mergekit_compute="dtype",
)
def dare_linear(inputs: TensorInputs, p: Params) -> Merged:
    if p["conventions"] == "mergekit":
        sparse, fractions = mergekit.sparsified(inputs, p["density"], p["rescale"])
        return mergekit.combine(
            inputs,
            sparse,
            p["weight"],
            consensus=None,
            normalize=p["normalize"],
            lam=p["lambda"],
            kept=fractions,
        )
    dropped, kept = zip(
        *(
            dare_drop(inputs, t, tv, p["density"][t], p["rescale"])
            for t, tv in enumerate(inputs.task_vectors())
        ),
        strict=True,
    )
    merged = weighted_sum(list(dropped), p["weight"], p["normalize"], inputs.name)
    assert inputs.base is not None
    return Merged(merged.mul_(p["lambda"]).add_(inputs.base), list(kept))
