"""What a task-conditional method returns per tensor: a unified task vector and one mask per task.

The engine writes these into an artifact (base, unified vector, packed one-bit masks, scales)
from which ``mergecli export`` rebuilds each task's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskMasks:
    """One tensor of every task: task t is ``θ0 + scales[t] · (masks[t] ⊙ unified)``."""

    unified: torch.Tensor
    masks: list[torch.Tensor]
    """Boolean, shaped like ``unified``."""
    scales: list[float] | None = None
    """Per-task rescalers (None: 1 for every task)."""
