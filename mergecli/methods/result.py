"""What a method returns for one tensor: its result and, per expert, the fraction it kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergecli.methods.task_masks import TaskMasks

Kept = list[float | None]
"""Per expert, the fraction of its entries that the merge kept (None: the method keeps no
count, and the report counts the non-zero entries of the task vector)."""


@dataclass
class Merged:
    """A method's result for one tensor and the fractions it kept."""

    value: torch.Tensor | TaskMasks
    kept: Kept


def as_merged(result: torch.Tensor | TaskMasks | Merged, experts: int) -> Merged:
    """A method's return value as a ``Merged`` (a bare result keeps no counts)."""
    return result if isinstance(result, Merged) else Merged(result, [None] * experts)


def kept_fraction(mask: torch.Tensor) -> float:
    """The fraction of a mask's entries that are non-zero."""
    return int(torch.count_nonzero(mask)) / max(mask.numel(), 1)
