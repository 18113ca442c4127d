"""TALL masks and Consensus merging: keep the entries each task's mask says matter to it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergecli.errors import RecipeError
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import FRACTION, NON_NEGATIVE, Param, Params, merge_method
from mergecli.methods.result import Kept, Merged
from mergecli.methods.sparsify import disjoint_merge, elect_sign
from mergecli.methods.statistics import Statistic
from mergecli.methods.task_masks import TaskMasks
from mergecli.methods.ties import SCOPE, model_scope_thresholds, trimmed_task_vectors

MASK_LAMBDA = Param("lambda", 0.6, help="mask threshold λt", per_model=True, bounds=NON_NEGATIVE)
USE_TIES = Param("use_ties", False, bool, "τMTL is the TIES merge instead of Σ τt")
TIES_DENSITY = Param(
    "density", 0.2, help="TIES density (with use_ties)", per_model=True, bounds=FRACTION
)
TIES_SCOPE = Param("scope", "model", str, "TIES scope (with use_ties)", choices=SCOPE.choices)
CONVENTION = (
    "Masks compare strictly: mt = [abs(τt) > λt·abs(τMTL − τt)]. use_ties: τMTL is TIES with "
    "density and scope, unweighted, mass sign election and disjoint mean, without scaling."
)


def multitask_vector(inputs: TensorInputs, p: Params) -> torch.Tensor:
    """τMTL: Σ τt, or the TIES merge of the task vectors with use_ties."""
    if not p["use_ties"]:
        return torch.stack(inputs.task_vectors()).sum(0)
    trimmed = trimmed_task_vectors(inputs, p)
    ones = [1.0] * len(trimmed)
    merged = disjoint_merge(trimmed, ones, elect_sign(trimmed, "mass"), "mean").value
    assert isinstance(merged, torch.Tensor)
    return merged


def tall_masks_of(
    inputs: TensorInputs, mtl: torch.Tensor, lambdas: list[float]
) -> list[torch.Tensor]:
    """mt = [abs(τt) > λt · abs(τMTL − τt)] for every task."""
    return [
        tv.abs() > lam * (mtl - tv).abs()
        for tv, lam in zip(inputs.task_vectors(), lambdas, strict=True)
    ]


def ties_thresholds(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None]
) -> list[Statistic]:
    """TIES' model-scope thresholds for the tensors whose τMTL is a TIES merge."""
    return model_scope_thresholds(
        {name: p for name, p in params_by_tensor.items() if p["use_ties"]}, warn
    )


def check_density(p: Params, name: str) -> None:
    if p["use_ties"] and not all(0 <= d <= 1 for d in p["density"]):
        raise RecipeError(
            f"density: TIES needs densities in [0, 1], got {p['density']} ({name})",
            key="parameters.density",
        )


def check_consensus(p: Params, name: str) -> None:
    check_density(p, name)
    if not 0 <= p["k"] <= len(p["lambda"]):
        raise RecipeError(
            f"parameters.k: consensus needs 0 ≤ k ≤ {len(p['lambda'])} (the number of "
            f"experts), got {p['k']} ({name})",
            key="parameters.k",
        )


@merge_method(
    "consensus",
    "Consensus merging: τMTL = Σ τt (or TIES with use_ties), TALL masks mt = [abs(τt) > "
    "λt·abs(τMTL − τt)]; keep entries where at least k masks agree: θ = θ0 + α·[Σ mt ≥ k] ⊙ τMTL",
    params=(
        MASK_LAMBDA,
        Param("k", 2, int, "masks that must agree for an entry to be kept"),
        Param("alpha", 1.0, help="scaling α of the kept multi-task vector"),
        USE_TIES,
        TIES_DENSITY,
        TIES_SCOPE,
    ),
    statistics=ties_thresholds,
    check=check_consensus,
    convention=CONVENTION + " k = 2 removes selfish weights (useful to one task only).",
)
def consensus(inputs: TensorInputs, p: Params) -> Merged:
    mtl = multitask_vector(inputs, p)
    masks = tall_masks_of(inputs, mtl, p["lambda"])
    keep = torch.stack(masks).sum(0) >= p["k"]
    kept: Kept = [float((mask & keep).sum()) / max(keep.numel(), 1) for mask in masks]
    assert inputs.base is not None
    return Merged(inputs.base + p["alpha"] * (mtl * keep), kept)


@merge_method(
    "tall_masks",
    "TALL masks: τMTL = Σ τt (or TIES with use_ties) and per task mt = [abs(τt) > "
    "λt·abs(τMTL − τt)]; writes an artifact from which task t is θ0 + mt ⊙ τMTL",
    params=(MASK_LAMBDA, USE_TIES, TIES_DENSITY, TIES_SCOPE),
    statistics=ties_thresholds,
    check=check_density,
    output="task_masks",
    convention=CONVENTION + " The artifact stores θ0, τMTL and one bit per entry and task.",
)
def tall_masks(inputs: TensorInputs, p: Params) -> Merged:
    mtl = multitask_vector(inputs, p)
    masks = tall_masks_of(inputs, mtl, p["lambda"])
    kept: Kept = [float(mask.sum()) / max(mask.numel(), 1) for mask in masks]
    return Merged(TaskMasks(mtl, masks), kept)
