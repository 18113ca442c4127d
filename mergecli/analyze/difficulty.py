"""Data difficulty: EL2N scores from early checkpoints and quantile bins (undertraining §2.4, §4).

EL2N(x) = E ‖p(θ, x) − onehot(y)‖₂ (Paul et al., 2021), the expectation taken as the mean over
the early checkpoints given (§4: after 32 steps, over 10 seeds; here whatever checkpoints the
user names, one per run). Bins are quantiles of the scores within one task's data: examples
sorted by (EL2N, position in the file) ascending, the example of rank r (0-based, n examples)
in bin ⌊r·B/n⌋ + 1, so bin 1 holds the easiest n/B examples and bin B the hardest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergecli.errors import EvaluationError, SourceError
from mergecli.evaluate.predictions import Predictions
from mergecli.evaluate.tasks import Task
from mergecli.recipe import Recipe


def el2n(runs: list[Predictions]) -> torch.Tensor:
    """Mean over the runs of ‖p − onehot(y)‖₂, per example."""
    return torch.stack([run.el2n() for run in runs]).mean(0)


def quantile_bins(scores: torch.Tensor, bins: int, task: str) -> torch.Tensor:
    """Bin of each example (1 = lowest scores … ``bins``), equal-count quantiles."""
    n = len(scores)
    if n < bins:
        raise EvaluationError(f"task {task}: {n} examples, fewer than the {bins} bins asked for")
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    out = torch.empty(n, dtype=torch.long)
    for rank, index in enumerate(order):
        out[index] = rank * bins // n + 1
    return out


def checkpoint_for(recipe: Recipe, template: str, task: Task, option: str) -> Path:
    """The folder a template names for a task: ``{task}`` replaced by the task's name, relative
    to the recipe's folder; an error naming the option when it does not exist."""
    path = recipe.resolve_path(template.replace("{task}", task.name))
    if not (path / "config.json").is_file():
        raise SourceError(f"{option} {template}: no checkpoint at {path} (task {task.name})", path)
    return path
