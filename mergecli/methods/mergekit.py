"""mergekit 0.1.5's sparsification and sign consensus, for ``conventions: mergekit``.

As mergekit's generalized task arithmetic: each task vector is sparsified alone (per tensor),
optionally rescaled so that it keeps its L1 norm, multiplied by its weight; with consensus the
sign is elected from the weighted sum (≥ 0 elects +1) and only entries whose sign equals it are
summed, divided (normalize) by the sum of the agreeing experts' weights (0 → 1); without
consensus the weighted sum is divided by Σ wt (abs below 1e-8 → 1). θ = θ0 + λ · that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.result import Kept, Merged, kept_fraction
from mergecli.methods.sparsify import kth_largest, magnitude_trim
from mergecli.ops import abs_sum64

NORM_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit does not rescale."""


def l1_rescaled(tv: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` scaled so that its L1 norm equals that of ``tv`` (unless either is ~0)."""
    before, after = abs_sum64(tv), abs_sum64(masked)
    if before < NORM_EPS or after < NORM_EPS:
        return masked
    return masked * (before / after)


def magnitude(tv: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) largest magnitudes (density ≥ 1: all, ≤ 0: none)."""
    if density >= 1:
        return tv
    if density <= 0 or tv.numel() == 0:
        return torch.zeros_like(tv)
    k = max(1, int(density * tv.numel()))
    kappa = kth_largest(tv, k)
    if int((tv.abs() >= kappa).sum()) == k:
        masked = magnitude_trim(tv, kappa)
    else:  # magnitudes tie at the k-th (common in bfloat16)
        masked = sorted_slice(tv, 0, k, descending=True)
    return l1_rescaled(tv, masked) if rescale else masked


def sorted_slice(tv: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """``tv`` where positions [start, stop) of torch's sort of ``abs(tv)`` fall, else 0: which of
    tied magnitudes mergekit keeps (its unstable sort, of float32 magnitudes on the CPU)."""
    w = tv.abs().reshape(-1)
    order = torch.sort(w.float() if w.device.type == "cpu" else w, descending=descending).indices
    mask = torch.zeros(tv.numel(), dtype=tv.dtype, device=tv.device)
    mask[order[start:stop]] = 1
    return tv * mask.reshape_as(tv)


def outliers(tv: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: of the magnitudes sorted ascending keep positions [b, b + ⌊density·n⌋),
    b = max(0, n − ⌊density·n⌋ − ⌊gamma·n⌋) (density ≥ 1: everything)."""
    if density >= 1:
        return tv
    n = tv.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    if target == 0:
        return torch.zeros_like(tv)
    magnitude_ = tv.abs()
    top = kth_largest(tv, n - bottom - target)  # +inf when nothing is dropped at the top
    low = kth_largest(tv, n - bottom)
    window = (magnitude_ < top) & (magnitude_ >= low)
    if int(window.sum()) == target:
        masked = tv * window
    else:  # magnitudes tie at a boundary (common in bfloat16)
        masked = sorted_slice(tv, bottom, bottom + target, descending=False)
    return l1_rescaled(tv, masked) if rescale else masked


def bernoulli(
    inputs: TensorInputs, t: int, tv: torch.Tensor, keep: float | torch.Tensor, rescale: bool
) -> tuple[torch.Tensor, float]:
    """A random keep-mask (probability ``keep``) applied, L1-rescaled when ``rescale``; and the
    fraction of entries the mask keeps.

    The mask is mergecli's seeded one (mergekit draws from torch's global generator)."""
    mask = inputs.bernoulli_mask(t, keep)
    masked = tv * mask
    return (l1_rescaled(tv, masked) if rescale else masked), kept_fraction(mask)


def sparsified(
    inputs: TensorInputs, densities: Sequence[float], rescale: bool
) -> tuple[list[torch.Tensor], Kept]:
    """DARE under mergekit's conventions: each task vector through ``bernoulli`` (density ≥ 1
    keeps it whole); the sparse vectors and the fractions their masks keep."""
    out: list[torch.Tensor] = []
    kept: Kept = []
    for t, (tv, d) in enumerate(zip(inputs.task_vectors(), densities, strict=True)):
        x, k = (tv, 1.0) if d >= 1 else bernoulli(inputs, t, tv, d, rescale)
        out.append(x)
        kept.append(k)
    return out, kept


def combine(
    inputs: TensorInputs,
    sparse: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: str | None,
    normalize: bool,
    lam: float,
    kept: Kept | None = None,
) -> Merged:
    """θ0 + λ · (the weighted, elected, normalized sum of the sparse task vectors); kept: the
    agreeing non-zero entries with consensus, else ``kept`` (None: the report counts)."""
    assert inputs.base is not None
    stacked = torch.stack(list(sparse))
    # the weights in the compute dtype, as mergekit holds them (bfloat16 rounds 0.6 to 0.6016)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    stacked *= w.reshape(shape)
    fractions: Kept = list(kept) if kept is not None else [None] * len(sparse)
    if consensus is None:
        mixed = stacked.sum(0)
        divisor = w.sum()
        if normalize:
            mixed /= divisor if abs(float(divisor)) >= 1e-8 else 1.0
    else:
        signs = stacked.sign()
        votes = stacked.sum(0) if consensus == "mass" else signs.sum(0)
        gamma = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = (signs == gamma).to(stacked.dtype)
        fractions = [kept_fraction(agree[t] * (sparse[t] != 0)) for t in range(len(sparse))]
        mixed = (stacked * agree).sum(0)
        if normalize:
            agreeing = (w.reshape(shape) * agree).sum(0)
            agreeing[agreeing == 0] = 1
            mixed /= agreeing
    if lam != 1:
        mixed *= lam
    return Merged(inputs.base + mixed, fractions)
