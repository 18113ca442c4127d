"""TIES-merging (trim, elect sign, disjoint merge) and DARE-TIES."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergecli.methods.inputs import TensorInputs, row_chunks
from mergecli.methods.linear import LAMBDA, WEIGHT
from mergecli.methods.registry import Param, Params, merge_method
from mergecli.methods.sparsify import (
    dare_drop,
    disjoint_merge,
    elect_sign,
    magnitude_trim,
    model_scope_values,
    tensor_threshold,
)
from mergecli.methods.statistics import KthLargestMagnitude, Statistic

THRESHOLDS = "ties.thresholds"
BLOCK_ELEMENTS = 1 << 20
"""Entries per row block of a large tensor that TIES merges whole."""

MERGE_FUNC = Param("merge_func", "mean", str, "disjoint merge", choices=("mean", "sum", "max"))
SIGN = Param("sign", "mass", str, "sign election: Σ τ̂t or Σ sign(τ̂t)", choices=("mass", "count"))
NORMALIZE = Param(
    "normalize", True, bool, "mergekit compatibility: false turns merge_func mean into sum"
)
SCOPE = Param("scope", "model", str, "where the top-k is taken", choices=("model", "tensor"))
MERGEKIT_IGNORED = {"int8_mask": "a mergekit memory option that mergecli does not need"}


def ties_vector(inputs: TensorInputs, trimmed: list[torch.Tensor], p: Params) -> torch.Tensor:
    """τm: the disjoint merge of the trimmed task vectors around the elected sign."""
    merge_func = "sum" if p["merge_func"] == "mean" and not p["normalize"] else p["merge_func"]
    gamma = elect_sign(trimmed, p["sign"])
    return disjoint_merge(inputs, trimmed, p["weight"], gamma, merge_func)


def elect_and_merge(inputs: TensorInputs, trimmed: list[torch.Tensor], p: Params) -> torch.Tensor:
    """θ0 + λ · disjoint merge of the trimmed task vectors around the elected sign."""
    assert inputs.base is not None
    return ties_vector(inputs, trimmed, p).mul_(p["lambda"]).add_(inputs.base)


def trim_thresholds(inputs: TensorInputs, p: Params) -> list[float]:
    """κt: the magnitude each task vector's top ``density`` starts at, within ``scope``."""
    if p["scope"] == "model":
        return inputs.stats[THRESHOLDS]
    tvs = inputs.task_vectors()
    return [tensor_threshold(tv, d) for tv, d in zip(tvs, p["density"], strict=True)]


def trimmed_task_vectors(
    inputs: TensorInputs, p: Params, thresholds: list[float] | None = None
) -> list[torch.Tensor]:
    """τ̂t: each task vector keeps its top ``density`` by magnitude, within ``scope``."""
    thresholds = thresholds if thresholds is not None else trim_thresholds(inputs, p)
    return [magnitude_trim(tv, k) for tv, k in zip(inputs.task_vectors(), thresholds, strict=True)]


def model_scope_thresholds(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None]
) -> list[Statistic]:
    """The exact model-scope top-k thresholds, when any tensor uses scope: model."""
    shared = model_scope_values(params_by_tensor, warn, ("density",))
    return [] if shared is None else [KthLargestMagnitude(THRESHOLDS, [d for (d,) in shared])]


@merge_method(
    "ties",
    "TIES: keep the top density of abs(τt), elect γ = sign(Σ τ̂t), average the entries that "
    "agree with γ; θ = θ0 + λ τm",
    params=(
        WEIGHT,
        Param("density", 0.2, help="fraction of entries kept by magnitude", per_model=True),
        LAMBDA,
        SCOPE,
        MERGE_FUNC,
        SIGN,
        NORMALIZE,
    ),
    statistics=model_scope_thresholds,
    ignored=MERGEKIT_IGNORED,
    elementwise=lambda p: p["scope"] == "model",
    convention=(
        "scope: model (original TIES code) is the default; mergekit and peft trim per tensor "
        "(scope: tensor). k = ceil(density·n) (peft: floor); entries equal to the k-th "
        "magnitude are kept; the election uses unweighted trimmed vectors; a zero sum elects "
        "+1; merge_func mean divides by Σ wt over the agreeing experts (peft divides the "
        "weighted sum by their count). Densities that vary across tensors (gradients, filters) "
        "imply scope: tensor."
    ),
)
def ties(inputs: TensorInputs, p: Params) -> torch.Tensor:
    """Once the thresholds are known TIES is elementwise: a large tensor (merged whole, as
    scope: tensor needs) is trimmed, elected and merged in row blocks, so its temporaries are
    those of one block."""
    thresholds = trim_thresholds(inputs, p)
    inputs.task_vectors()  # once, before the blocks view them
    assert inputs.base is not None
    chunks = row_chunks(tuple(inputs.base.shape), BLOCK_ELEMENTS)
    if chunks is None:
        return elect_and_merge(inputs, trimmed_task_vectors(inputs, p, thresholds), p)
    out = torch.empty_like(inputs.base)
    counts = [0] * inputs.num_experts
    for start, stop in chunks:
        part = inputs.rows(start, stop)
        trimmed = trimmed_task_vectors(part, p, thresholds)
        out[start:stop] = elect_and_merge(part, trimmed, p)
        n = part.base.numel() if part.base is not None else 0
        counts = [c + round((k or 0.0) * n) for c, k in zip(counts, part.kept, strict=True)]
    inputs.kept = [c / inputs.base.numel() for c in counts]
    return out


@merge_method(
    "dare_ties",
    "DARE masks (keep with probability density, rescale by 1/density), then TIES election and "
    "disjoint merge on τ̃ (no magnitude trim)",
    params=(
        WEIGHT,
        Param("density", 0.5, help="keep probability", per_model=True),
        LAMBDA,
        MERGE_FUNC,
        SIGN,
        NORMALIZE,
        Param("rescale", True, bool, "divide kept entries by density (mergekit's option)"),
    ),
    ignored=MERGEKIT_IGNORED,
    convention=(
        "Masks: Philox4x32-10 keyed by (seed, expert index, tensor name), one uniform per "
        "entry index, so chunks, threads and devices do not change them."
    ),
    elementwise=True,
)
def dare_ties(inputs: TensorInputs, p: Params) -> torch.Tensor:
    dropped = [
        dare_drop(inputs, t, tv, p["density"][t], p["rescale"])
        for t, tv in enumerate(inputs.task_vectors())
    ]
    return elect_and_merge(inputs, dropped, p)
