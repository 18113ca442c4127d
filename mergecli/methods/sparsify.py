"""Shared pieces of the sparsifying methods: magnitude trim, DARE drop, TIES election."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Params
from mergecli.methods.result import Kept, Merged, kept_fraction
from mergecli.methods.statistics import kth_rank

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
PHILOX_MASKS = (
    "Masks: Philox4x32-10 keyed by (seed, expert index, tensor name), one uniform per entry "
    "index, so chunks, threads and devices do not change them (conventions: mergekit keeps "
    "a CPU torch.rand stream with the same key over the whole tensor)."
)
"""The convention of mergecli's DARE masks (``dare_drop``)."""


def kth_largest(tv: torch.Tensor, rank: int) -> float:
    """The ``rank``-th largest ``abs(tv)`` (1-based); +inf when rank = 0. On the CPU from the
    digit histograms of the bit patterns (no copy); elsewhere by a selection on a copy."""
    if rank == 0:
        return float("inf")
    if tv.device.type == "cpu" and tv.dtype in _BITS:
        from mergecli.methods.histogram import kth_largest_magnitude  # numba, on first use

        bits = tv.contiguous().view(_BITS[tv.dtype]).reshape(-1).numpy()
        pattern = torch.tensor(kth_largest_magnitude(bits, rank), dtype=_BITS[tv.dtype])
        return float(pattern.view(tv.dtype))
    # a selection in place on the private copy abs() makes: no sorted copy, no int64 indices;
    # half-precision magnitudes (mergekit's conventions) are widened exactly, numpy has no bf16
    flat = tv.abs().reshape(-1).cpu()
    magnitudes = (flat if flat.dtype in _BITS else flat.float()).numpy()
    magnitudes.partition(tv.numel() - rank)
    return float(magnitudes[tv.numel() - rank])


def tensor_threshold(tv: torch.Tensor, density: float) -> float:
    """k-th largest ``abs(tv)`` with k = ceil(density · n); +inf when k = 0."""
    return kth_largest(tv, kth_rank(density, tv.numel()))


def model_scope_values(
    params_by_tensor: dict[str, Params], warn: Callable[[str], None], names: tuple[str, ...]
) -> list[tuple[float, ...]] | None:
    """Per expert, the per-model parameters ``names`` shared by every tensor with scope: model.

    None when no tensor has scope: model, or when the values vary across tensors (gradients,
    filters): a whole-model rank needs one value per expert, so those tensors then fall back to
    scope: tensor, with a warning.
    """
    scoped = [p for p in params_by_tensor.values() if p["scope"] == "model"]
    if not scoped:
        return None
    values = {tuple(zip(*(p[k] for k in names), strict=True)) for p in scoped}
    if len(values) > 1:
        verb = "varies" if len(names) == 1 else "vary"
        warn(
            f"{' and '.join(names)} {verb} across tensors, so each tensor is trimmed alone "
            "(scope: tensor)"
        )
        for p in scoped:
            p["scope"] = "tensor"
        return None
    return list(values.pop())


def magnitude_trim(tv: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ ⊙ [abs(τ) ≥ κ]: entries tied with the threshold are kept.

    Computed as a hard shrink at the float just below κ (abs(τ) > that ⇔ abs(τ) ≥ κ), one
    vectorised pass instead of a comparison, a boolean mask and a product.
    """
    return torch.nn.functional.hardshrink(tv, shrink_below(threshold, tv.dtype))


def shrink_below(threshold: float, dtype: torch.dtype) -> float:
    """The float of ``dtype`` just below κ: abs(τ) > it ⇔ abs(τ) ≥ κ."""
    kappa = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(kappa, torch.zeros_like(kappa)))


def dare_drop(
    inputs: TensorInputs, t: int, tv: torch.Tensor, density: float, rescale: bool = True
) -> tuple[torch.Tensor, float]:
    """m ⊙ τ / density with m ~ Bernoulli(density), a Philox mask keyed by (seed, expert,
    tensor) and drawn by entry index (mergecli's convention); and the fraction it keeps."""
    mask = inputs.philox_mask(t, density)
    kept = tv * mask
    return kept.div_(density) if rescale and density > 0 else kept, kept_fraction(mask)


def elect_sign(trimmed: Sequence[torch.Tensor], sign: str) -> torch.Tensor:
    """γ = sign(Σ τ̂t) (``mass``) or sign(Σ sign(τ̂t)) (``count``); zeros elect +1."""
    total = torch.zeros_like(trimmed[0])
    for tv in trimmed:
        total += tv if sign == "mass" else torch.sign(tv)
    # the sum starts at +0 and IEEE sums are -0 only when every term is, so a zero is +0
    return torch.ones_like(total).copysign_(total)


def disjoint_merge(
    trimmed: Sequence[torch.Tensor],
    weights: Sequence[float],
    gamma: torch.Tensor,
    merge_func: str,
) -> Merged:
    """Combine the entries that agree with γ: weighted mean, weighted sum or signed max; kept:
    per expert, the fraction of entries that contribute.

    Only arithmetic passes (no boolean masks): γ is ±1, so τ̂t·γ > 0 exactly where τ̂t agrees.
    """
    out = torch.zeros_like(gamma)
    norm = torch.zeros_like(gamma) if merge_func == "mean" else None
    kept: Kept = []
    for tv, w in zip(trimmed, weights, strict=True):
        aligned = (tv * gamma).clamp_(min=0)  # abs(τ̂t) where it agrees with γ, else 0
        kept.append(kept_fraction(aligned))
        if merge_func == "max":
            torch.maximum(out, aligned, out=out)
            continue
        if norm is not None:
            norm += torch.sign(aligned).mul_(w)  # w where τ̂t agrees, else 0
        out += aligned.mul_(gamma).mul_(w)  # τ̂t·w where it agrees
    if merge_func == "max":
        return Merged(out.mul_(gamma), kept)
    if norm is not None:
        nonzero = torch.sign(norm).abs_()  # 1 where Σ w over the agreeing experts ≠ 0
        norm += nonzero.neg().add_(1)  # a 0 becomes 1, any other value is unchanged
        out.div_(norm).mul_(nonzero)
    return Merged(out, kept)
