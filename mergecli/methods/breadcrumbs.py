"""Model breadcrumbs: drop the largest and the smallest magnitudes of each task vector."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mergecli.errors import RecipeError
from mergecli.methods import mergekit
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.linear import LAMBDA, WEIGHT, weighted_sum
from mergecli.methods.registry import DROPPED, FRACTION, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged, kept_fraction
from mergecli.methods.sparsify import kth_largest, model_scope_values
from mergecli.methods.statistics import Handle, LargestMagnitudes, Statistic, floor_rank
from mergecli.methods.ties import (
    L1_RESCALE,
    MERGE_FUNC,
    MERGEKIT_ELECTION,
    MERGEKIT_IGNORED,
    NORMALIZE_MERGEKIT_OFF,
    SCOPE,
    SIGN,
    check_mergekit,
    elect_and_merge,
    mergekit_combine,
)

THRESHOLDS: Handle[list[list[float]]] = Handle("breadcrumbs.thresholds")

DENSITY = Param(
    "density",
    0.9,
    help="fraction of entries kept",
    per_model=True,
    mergekit=1.0,
    bounds=FRACTION,
)
MERGEKIT_TRIM = (
    "scope tensor keeps, of the magnitudes sorted ascending, positions [b, b + ⌊density·n⌋) with "
    "b = max(0, n − ⌊density·n⌋ − ⌊gamma·n⌋); density ≥ 1 keeps everything (gamma unused)"
)
GAMMA = Param(
    "gamma",
    0.01,
    help="fraction of the largest magnitudes dropped",
    per_model=True,
    bounds=DROPPED,
)
CONVENTION = (
    "Entries of magnitude rank r (1 = largest) are kept when ⌊γn⌋ < r ≤ ⌊(γ+density)n⌋ "
    "(products rounded to 9 decimals; mergekit keeps ⌊density·n⌋ below the top ⌊γn⌋). "
    "As thresholds: entries tied with the ⌊γn⌋-th magnitude are dropped, entries tied with "
    "the ⌊(γ+density)n⌋-th kept. scope: model ranks each expert's whole task vector (exact, "
    "two statistics passes); densities or gammas that vary across tensors imply scope: tensor."
)


def breadcrumb_ranks(density: float, gamma: float, n: int) -> list[int]:
    """The ranks of the two thresholds: the last dropped at the top, the last kept."""
    return [floor_rank(gamma, n), floor_rank(gamma + density, n)]


def breadcrumb_trim(tv: torch.Tensor, top: float, low: float) -> torch.Tensor:
    """τ ⊙ [low ≤ abs(τ) < top]."""
    magnitude = tv.abs()
    return tv * ((magnitude < top) & (magnitude >= low))


def breadcrumbs_trimmed(inputs: TensorInputs, p: Params) -> list[torch.Tensor]:
    """Every task vector without its top γ and its bottom magnitudes, within ``scope``
    (L1-rescaled with ``rescale``; ``kept_fraction`` of each is what it keeps)."""
    tvs = inputs.task_vectors()
    if p["conventions"] == "mergekit" and p["scope"] == "tensor":
        return [
            mergekit.outliers(tv, d, g, p["rescale"])
            for tv, d, g in zip(tvs, p["density"], p["gamma"], strict=True)
        ]
    if p["scope"] == "model":
        thresholds = inputs.stats[THRESHOLDS]
    else:
        thresholds = [
            [kth_largest(tv, r) for r in breadcrumb_ranks(d, g, tv.numel())]
            for tv, d, g in zip(tvs, p["density"], p["gamma"], strict=True)
        ]
    trimmed = [
        breadcrumb_trim(tv, top, low) for tv, (top, low) in zip(tvs, thresholds, strict=True)
    ]
    if p["rescale"]:
        trimmed = [mergekit.l1_rescaled(tv, x) for tv, x in zip(tvs, trimmed, strict=True)]
    return trimmed


def model_scope_thresholds(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None]
) -> list[Statistic]:
    """Both rank thresholds of each expert's whole task vector, when scope is model."""
    shared = model_scope_values(params_by_tensor, warn, ("density", "gamma"))
    if shared is None:
        return []
    ranks = [functools.partial(breadcrumb_ranks, d, g) for d, g in shared]
    return [LargestMagnitudes(THRESHOLDS, ranks)]


def check_fractions(p: Params, name: str) -> None:
    check_mergekit(p, name)
    if p["conventions"] == "mergekit":
        return  # mergekit clamps: density ≥ 1 keeps all, density + gamma > 1 drops no bottom
    for t, (d, g) in enumerate(zip(p["density"], p["gamma"], strict=True)):
        if not (0 <= d <= 1 and 0 <= g <= 1 and d + g <= 1):
            raise RecipeError(
                f"models[{t}]: breadcrumbs needs 0 ≤ density, 0 ≤ gamma and density + gamma ≤ 1 "
                f"(got density {d}, gamma {g} for '{name}')",
                key=f"models[{t}].parameters",
            )


@merge_method(
    "breadcrumbs",
    "Model breadcrumbs: per scope drop the largest gamma fraction of abs(τt) and the smallest, "
    "keeping a density fraction; then task arithmetic θ = θ0 + λ Σ wt τ̂t",
    params=(
        WEIGHT,
        DENSITY,
        GAMMA,
        LAMBDA,
        SCOPE,
        Param("normalize", False, bool, "divide by Σ wt"),
        L1_RESCALE,
    ),
    statistics=model_scope_thresholds,
    check=check_fractions,
    ignored=MERGEKIT_IGNORED,
    convention=CONVENTION,
    mergekit=MERGEKIT_TRIM + "; abs(Σ wt) < 1e-8 is not divided by",
    mergekit_compute="dtype",
)
def breadcrumbs(inputs: TensorInputs, p: Params) -> Merged:
    trimmed = breadcrumbs_trimmed(inputs, p)
    kept: Kept = [kept_fraction(x) for x in trimmed]
    if p["conventions"] == "mergekit":
        return mergekit.combine(
            inputs,
            trimmed,
            p["weight"],
            consensus=None,
            normalize=p["normalize"],
            lam=p["lambda"],
            kept=kept,
        )
    merged = weighted_sum(trimmed, p["weight"], p["normalize"], inputs.name)
    assert inputs.base is not None
    return Merged(inputs.base + p["lambda"] * merged, kept)


@merge_method(
    "breadcrumbs_ties",
    "Breadcrumbs masks, then TIES election γ = sign(Σ τ̂t) and disjoint merge; θ = θ0 + λ τm",
    params=(
        WEIGHT,
        DENSITY,
        GAMMA,
        LAMBDA,
        SCOPE,
        MERGE_FUNC,
        SIGN,
        NORMALIZE_MERGEKIT_OFF,
        L1_RESCALE,
    ),
    statistics=model_scope_thresholds,
    check=check_fractions,
    ignored=MERGEKIT_IGNORED,
    convention=CONVENTION + " Election and disjoint merge as in ties.",
    mergekit=MERGEKIT_TRIM + "; " + MERGEKIT_ELECTION,
    mergekit_compute="dtype",
)
def breadcrumbs_ties(inputs: TensorInputs, p: Params) -> Merged:
    if p["conventions"] == "mergekit":
        return mergekit_combine(inputs, breadcrumbs_trimmed(inputs, p), p)
    return elect_and_merge(inputs, breadcrumbs_trimmed(inputs, p), p)
