"""EMR-merging: elect a unified task vector, then per-task masks and rescalers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Params, merge_method
from mergecli.methods.result import Kept, Merged
from mergecli.methods.statistics import Handle, Statistic
from mergecli.methods.task_masks import TaskMasks
from mergecli.ops import abs_sum64

RESCALERS: Handle[list[float]] = Handle("emr.rescalers")


def emr_parts(tvs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """τuni = γ ⊙ max_t abs(mt ⊙ τt) and mt = [τt ⊙ γ > 0], with γ = sign(Σ τt) (0 → −1)."""
    gamma = torch.where(torch.stack(tvs).sum(0) > 0, 1.0, -1.0).to(tvs[0].dtype)
    masks = [tv * gamma > 0 for tv in tvs]
    magnitude = torch.stack([tv.abs() * m for tv, m in zip(tvs, masks, strict=True)]).amax(0)
    return gamma * magnitude, masks


class Rescalers:
    """ξt = Σn mean(abs τt,n) / Σn mean(abs(mt,n ⊙ τuni,n)) over the merged tensors n.

    One streaming pass; holds two float64 sums per expert.
    """

    def __init__(self, handle: Handle[list[float]]) -> None:
        self.handle = handle
        self.tensors: set[str] | None = None
        self.task: list[float] = []
        self.masked: list[float] = []
        self.done = False

    def passes(self, compute_dtype: torch.dtype) -> int:
        return 1

    def wants_pass(self) -> bool:
        return not self.done

    def observe(self, inputs: TensorInputs) -> None:
        tvs = inputs.task_vectors()
        unified, masks = emr_parts(tvs)
        if not self.task:
            self.task, self.masked = [0.0] * len(tvs), [0.0] * len(tvs)
        n = unified.numel()
        for t, (tv, mask) in enumerate(zip(tvs, masks, strict=True)):
            self.task[t] += abs_sum64(tv) / n
            self.masked[t] += abs_sum64(unified * mask) / n

    def end_pass(self) -> None:
        self.done = True

    def value(self) -> list[float]:
        """ξt per expert (1 where the masked unified vector is zero everywhere)."""
        return [a / b if b > 0 else 1.0 for a, b in zip(self.task, self.masked, strict=True)]


def rescalers(params_by_tensor: dict[str, Params], warn: Callable[[str], None]) -> list[Statistic]:
    return [Rescalers(RESCALERS)] if params_by_tensor else []


@merge_method(
    "emr",
    "EMR: γ = sign(Σ τt), mt = [τt ⊙ γ > 0], τuni = γ ⊙ max_t abs(mt ⊙ τt), rescalers "
    "ξt = Σn mean(abs τt,n) / Σn mean(abs(mt,n ⊙ τuni,n)); writes an artifact from which "
    "task t is θ0 + ξt (mt ⊙ τuni)",
    statistics=rescalers,
    output="task_masks",
    convention=(
        "A zero sign sum elects −1 (as the EMR code); the rescalers are whole-model (sums "
        "over every merged tensor, one statistics pass) and 1 for a task whose mask is empty. "
        "The artifact stores θ0, τuni, one bit per entry and task, and ξt."
    ),
)
def emr(inputs: TensorInputs, p: Params) -> Merged:
    unified, masks = emr_parts(inputs.task_vectors())
    kept: Kept = [float(mask.sum()) / max(mask.numel(), 1) for mask in masks]
    return Merged(TaskMasks(unified, masks, inputs.stats[RESCALERS]), kept)
