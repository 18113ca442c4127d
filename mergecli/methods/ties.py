"""TIES-merging (trim, elect sign, disjoint merge) and DARE-TIES."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn.functional import hardshrink

from mergecli.errors import RecipeError
from mergecli.methods import mergekit
from mergecli.methods.inputs import TensorInputs, row_chunks
from mergecli.methods.linear import INT8_MASK, LAMBDA, RESCALE_HELP, WEIGHT
from mergecli.methods.registry import FRACTION, Param, Params, merge_method
from mergecli.methods.result import Merged
from mergecli.methods.sparsify import (
    PHILOX_MASKS,
    dare_drop,
    disjoint_merge,
    elect_sign,
    magnitude_trim,
    model_scope_values,
    shrink_below,
    tensor_threshold,
)
from mergecli.methods.statistics import (
    Handle,
    KthLargestMagnitude,
    Statistic,
    TensorKthLargestMagnitude,
)

THRESHOLDS: Handle[list[float]] = Handle("ties.thresholds")
TENSOR_THRESHOLDS: Handle[dict[str, list[float]]] = Handle("ties.tensor_thresholds")
"""Per tensor streamed in row chunks with scope: tensor, each expert's threshold."""
BLOCK_ELEMENTS = 1 << 20
"""Entries per row block of a large tensor that TIES merges whole."""

MERGE_FUNC = Param("merge_func", "mean", str, "disjoint merge", choices=("mean", "sum", "max"))
SIGN = Param("sign", "mass", str, "sign election: Σ τ̂t or Σ sign(τ̂t)", choices=("mass", "count"))
NORMALIZE = Param(
    "normalize", True, bool, "mergekit compatibility: false turns merge_func mean into sum"
)
NORMALIZE_MERGEKIT_OFF = Param(
    "normalize",
    True,
    bool,
    "mergekit compatibility: false turns merge_func mean into sum",
    mergekit=False,
)
"""``normalize`` of the methods whose mergekit default is false (dare_ties, breadcrumbs_ties)."""
SCOPE = Param(
    "scope",
    "model",
    str,
    "where the top-k is taken",
    choices=("model", "tensor"),
    mergekit="tensor",
)
L1_RESCALE = Param(
    "rescale", False, bool, "rescale each trimmed task vector to its L1 norm (mergekit's option)"
)
MERGEKIT_IGNORED = INT8_MASK
MERGEKIT_CONSENSUS = (
    "the sign is elected from the weighted sum (Σ wt τ̂t ≥ 0 → +1); entries whose sign equals it "
    "are summed as wt τ̂t and divided by Σ wt over them (normalize; 0 → 1)"
)
MERGEKIT_ELECTION = MERGEKIT_CONSENSUS + "; merge_func max is refused"


def check_mergekit(p: Params, name: str) -> None:
    """mergekit's consensus has no signed max."""
    if p["conventions"] == "mergekit" and p.get("merge_func") == "max":
        raise RecipeError(
            f"parameters.merge_func: mergekit has no merge_func max (for '{name}'); use mean "
            "or sum, or conventions: mergecli",
            key="parameters.merge_func",
        )


def mergekit_combine(inputs: TensorInputs, sparse: list[torch.Tensor], p: Params) -> Merged:
    """mergekit's election and merge of sparsified task vectors (merge_func sum: no division)."""
    normalize = p["normalize"] and p.get("merge_func", "mean") == "mean"
    return mergekit.combine(
        inputs,
        sparse,
        p["weight"],
        consensus=p.get("sign", "mass"),
        normalize=normalize,
        lam=p["lambda"],
    )


def ties_vector(trimmed: list[torch.Tensor], p: Params) -> Merged:
    """τm: the disjoint merge of the trimmed task vectors around the elected sign."""
    merge_func = "sum" if p["merge_func"] == "mean" and not p["normalize"] else p["merge_func"]
    gamma = elect_sign(trimmed, p["sign"])
    return disjoint_merge(trimmed, p["weight"], gamma, merge_func)


def elect_and_merge(
    inputs: TensorInputs, trimmed: list[torch.Tensor], p: Params, below: list[float] | None = None
) -> Merged:
    """θ0 + λ · disjoint merge of the trimmed task vectors around the elected sign (each first
    hard-shrunk at ``below`` when given): one compiled pass for float32 on the CPU."""
    assert inputs.base is not None
    fused = fused_merge(inputs.base, trimmed, p, below)
    if fused is not None:
        return fused
    if below is not None:
        trimmed = [hardshrink(tv, k) for tv, k in zip(trimmed, below, strict=True)]
    merged = ties_vector(trimmed, p)
    assert isinstance(merged.value, torch.Tensor)
    return Merged(merged.value.mul_(p["lambda"]).add_(inputs.base), merged.kept)


def kernel_merge(p: Params) -> tuple[bool, bool] | None:
    """(count, mean): the election and disjoint merge ``ties_kernel`` runs for these params;
    None where it does not (merge_func max, weights or λ not finite)."""
    merge_func = "sum" if p["merge_func"] == "mean" and not p["normalize"] else p["merge_func"]
    if merge_func == "max" or not all(math.isfinite(x) for x in [*p["weight"], p["lambda"]]):
        return None
    return p["sign"] == "count", merge_func == "mean"


def compiled_ties(
    inputs: TensorInputs, p: Params, dare: tuple[list[float], bool] | None = None
) -> Merged | None:
    """TIES (or, with ``dare`` = (densities, rescale), DARE-TIES) of the inputs as stored by
    ``ties_kernel.stored_ties`` where it applies: thresholds known without the whole tensor
    (model scope, or tensor scope streamed), the kernel's merge; else None, the inputs widened
    for the torch passes."""
    options = kernel_merge(p)
    thresholds: list[float] | None = None
    if dare is not None:
        thresholds = [0.0] * inputs.num_experts
    elif p["scope"] == "model":
        thresholds = inputs.stats[THRESHOLDS]
    else:
        thresholds = (inputs.stats.get(TENSOR_THRESHOLDS) or {}).get(inputs.name)
    fused = None
    if options is not None and thresholds is not None:
        from mergecli.methods.ties_kernel import stored_ties  # numba, on first use

        below = (
            [-math.inf] * inputs.num_experts
            if dare is not None
            else [shrink_below(k, torch.float32) for k in thresholds]
        )
        fused = stored_ties(inputs, below, p["weight"], p["lambda"], *options, dare)
    if fused is None:
        inputs.widen()
    return fused


def fused_merge(
    base: torch.Tensor, tvs: list[torch.Tensor], p: Params, below: list[float] | None
) -> Merged | None:
    """``elect_and_merge`` by ``ties_kernel`` where it applies (float32 on the CPU, mean or sum,
    finite weights and λ, finite entries); else None."""
    options = kernel_merge(p)
    if (
        options is None
        or base.device.type != "cpu"
        or any(x.dtype != torch.float32 or x.device != base.device for x in [base, *tvs])
    ):
        return None
    from mergecli.methods.ties_kernel import fused_ties  # numba, on first use

    shrink = below if below is not None else [-math.inf] * len(tvs)
    result = fused_ties(tvs, shrink, p["weight"], p["lambda"], base, *options)
    if result is None:
        return None
    out, counts = result
    n = max(base.numel(), 1)
    return Merged(out, [c / n for c in counts])


def trim_thresholds(inputs: TensorInputs, p: Params) -> list[float]:
    """κt: the magnitude each task vector's top ``density`` starts at, within ``scope``."""
    if p["scope"] == "model":
        return inputs.stats[THRESHOLDS]
    streamed = inputs.stats.get(TENSOR_THRESHOLDS)
    if streamed is not None and inputs.name in streamed:
        return streamed[inputs.name]
    tvs = inputs.task_vectors()
    return [tensor_threshold(tv, d) for tv, d in zip(tvs, p["density"], strict=True)]


def trimmed_task_vectors(
    inputs: TensorInputs, p: Params, thresholds: list[float] | None = None
) -> list[torch.Tensor]:
    """τ̂t: each task vector keeps its top ``density`` by magnitude, within ``scope``."""
    thresholds = thresholds if thresholds is not None else trim_thresholds(inputs, p)
    return [magnitude_trim(tv, k) for tv, k in zip(inputs.task_vectors(), thresholds, strict=True)]


def trim_elect_merge(inputs: TensorInputs, thresholds: list[float], p: Params) -> Merged:
    """θ0 + λ · disjoint merge of the task vectors trimmed at ``thresholds``."""
    tvs = inputs.task_vectors()
    below = [shrink_below(k, tv.dtype) for tv, k in zip(tvs, thresholds, strict=True)]
    return elect_and_merge(inputs, tvs, p, below)


def model_scope_thresholds(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None]
) -> list[Statistic]:
    """The exact model-scope top-k thresholds, when any tensor uses scope: model."""
    shared = model_scope_values(params_by_tensor, warn, ("density",))
    return [] if shared is None else [KthLargestMagnitude(THRESHOLDS, [d for (d,) in shared])]


def streams(p: Params) -> bool:
    """Whether TIES may take a tensor in row chunks: its thresholds then come from statistics
    passes (no L1 rescale, which needs the whole trimmed vector; not mergekit's own trim)."""
    return not p["rescale"] and (p["scope"] == "model" or p["conventions"] != "mergekit")


def ties_statistics(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None]
) -> list[Statistic]:
    """The model-scope thresholds, and the tensor-scope ones of the tensors TIES may stream
    (the engine keeps those it does stream in row chunks)."""
    model = model_scope_thresholds(params_by_tensor, warn)
    tensor = {
        name: p["density"]
        for name, p in params_by_tensor.items()
        if p["scope"] == "tensor" and streams(p)
    }
    return model + ([TensorKthLargestMagnitude(TENSOR_THRESHOLDS, tensor)] if tensor else [])


@merge_method(
    "ties",
    "TIES: keep the top density of abs(τt), elect γ = sign(Σ τ̂t), average the entries that "
    "agree with γ; θ = θ0 + λ τm",
    params=(
        WEIGHT,
        Param(
            "density",
            0.2,
            help="fraction of entries kept by magnitude",
            per_model=True,
            mergekit=1.0,
            bounds=FRACTION,
        ),
        LAMBDA,
        SCOPE,
        MERGE_FUNC,
        SIGN,
        NORMALIZE,
        L1_RESCALE,
    ),
    statistics=ties_statistics,
    check=check_mergekit,
    ignored=MERGEKIT_IGNORED,
    elementwise=streams,
    stored_inputs=lambda p: p["conventions"] != "mergekit" and not p["rescale"],
    mergekit="scope tensor keeps k = max(1, ⌊density·n⌋) entries (density ≥ 1: all); "
    + MERGEKIT_ELECTION,
    convention=(
        "scope: model (original TIES code) is the default; mergekit and peft trim per tensor "
        "(scope: tensor). k = ceil(density·n) (peft: floor); entries equal to the k-th "
        "magnitude are kept; the election uses unweighted trimmed vectors; a zero sum elects "
        "+1; merge_func mean divides by Σ wt over the agreeing experts (peft divides the "
        "weighted sum by their count). Densities that vary across tensors (gradients, filters) "
        "imply scope: tensor."
    ),
    mergekit_compute="dtype",
)
def ties(inputs: TensorInputs, p: Params) -> Merged:
    """Once the thresholds are known TIES is elementwise: the engine streams a large tensor in
    row chunks (its tensor-scope thresholds from ``TENSOR_THRESHOLDS``); one merged whole
    (another caller, an output that takes whole tensors) is trimmed, elected and merged in row
    blocks, so its temporaries are those of one block."""
    if p["conventions"] == "mergekit" or p["rescale"]:
        inputs.widen()
        return ties_whole(inputs, p)
    fused = compiled_ties(inputs, p)
    if fused is not None:
        return fused
    thresholds = trim_thresholds(inputs, p)
    inputs.task_vectors()  # once, before the blocks view them
    assert inputs.base is not None
    chunks = row_chunks(tuple(inputs.base.shape), BLOCK_ELEMENTS)
    if chunks is None:
        return trim_elect_merge(inputs, thresholds, p)
    out = torch.empty_like(inputs.base)
    counts = [0] * inputs.num_experts
    for start, stop in chunks:
        part = inputs.rows(start, stop)
        merged = trim_elect_merge(part, thresholds, p)
        assert isinstance(merged.value, torch.Tensor)
        out[start:stop] = merged.value
        n = part.base.numel() if part.base is not None else 0
        counts = [c + round((k or 0.0) * n) for c, k in zip(counts, merged.kept, strict=True)]
    return Merged(out, [c / inputs.base.numel() for c in counts])


def ties_whole(inputs: TensorInputs, p: Params) -> Merged:
    """TIES on the whole tensor: with L1 rescaling (which needs each whole trimmed task
    vector's norm) or under mergekit's conventions (its trim with scope: tensor)."""
    tvs = inputs.task_vectors()
    if p["conventions"] == "mergekit" and p["scope"] == "tensor":
        trimmed = [
            mergekit.magnitude(tv, d, p["rescale"]) for tv, d in zip(tvs, p["density"], strict=True)
        ]
        return mergekit_combine(inputs, trimmed, p)
    trimmed = trimmed_task_vectors(inputs, p)
    if p["rescale"]:
        trimmed = [mergekit.l1_rescaled(tv, x) for tv, x in zip(tvs, trimmed, strict=True)]
    if p["conventions"] == "mergekit":
        return mergekit_combine(inputs, trimmed, p)
    return elect_and_merge(inputs, trimmed, p)


@merge_method(
    "dare_ties",
    "DARE masks (keep with probability density, rescale by 1/density), then TIES election and "
    "disjoint merge on τ̃ (no magnitude trim)",
    params=(
        WEIGHT,
        Param(
            "density", 0.5, help="keep probability", per_model=True, mergekit=1.0, bounds=FRACTION
        ),
        LAMBDA,
        MERGE_FUNC,
        SIGN,
        NORMALIZE_MERGEKIT_OFF,
        Param("rescale", True, bool, RESCALE_HELP),
    ),
    check=check_mergekit,
    ignored=MERGEKIT_IGNORED,
    convention=PHILOX_MASKS,
    elementwise=lambda p: p["conventions"] != "mergekit",
    stored_inputs=lambda p: p["conventions"] != "mergekit",
    mergekit="rescale keeps each task vector's L1 norm (whole tensor) instead of ÷ density; "
    "density ≥ 1 keeps everything; " + MERGEKIT_ELECTION,
    mergekit_compute="dtype",
)
def dare_ties(inputs: TensorInputs, p: Params) -> Merged:
    if p["conventions"] == "mergekit":
        inputs.widen()
        sparse, _ = mergekit.sparsified(inputs, p["density"], p["rescale"])
        return mergekit_combine(inputs, sparse, p)
    fused = compiled_ties(inputs, p, (p["density"], p["rescale"]))
    if fused is not None:
        return fused
    dropped = [
        dare_drop(inputs, t, tv, p["density"][t], p["rescale"])[0]
        for t, tv in enumerate(inputs.task_vectors())
    ]
    return elect_and_merge(inputs, dropped, p)
