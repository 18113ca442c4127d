"""What a method returns for one tensor: its result and, per expert, the fraction it kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergecli.methods.task_masks import TaskMasks

Kept = list[float | None]
"""Per expert, the fraction of its entries that the merge kept (None: the method keeps no
count, and the report counts the non-zero entries of the task vector)."""


@dataclass
class PieceSums:
    """The report's sums over one piece, for each task vector τt and the merged delta δ:
    Σ τt², Σ δ², Σ τt·δ (float64), and the entries where τt ≠ 0, where τt·δ ≠ 0 and where
    τt·δ > 0 (a compiled merge sums them while it holds the piece; ``engine/figures.py``
    otherwise)."""

    tv_sq: list[float]
    delta_sq: float
    dot: list[float]
    nonzero: list[int]
    both: list[int]
    same: list[int]


@dataclass
class Merged:
    """A method's result for one tensor, the fractions it kept and, where it summed them, the
    report's sums."""

    value: torch.Tensor | TaskMasks
    kept: Kept
    sums: PieceSums | None = None
    checked: bool = False
    """The method found every input entry and every entry of ``value`` (in its dtype)
    finite as it computed (a compiled merge): the engine's finite-value guard is not run."""


def as_merged(result: torch.Tensor | TaskMasks | Merged, experts: int) -> Merged:
    """A method's return value as a ``Merged`` (a bare result keeps no counts)."""
    return result if isinstance(result, Merged) else Merged(result, [None] * experts)


def kept_fraction(mask: torch.Tensor) -> float:
    """The fraction of a mask's entries that are non-zero."""
    return int(torch.count_nonzero(mask)) / max(mask.numel(), 1)
