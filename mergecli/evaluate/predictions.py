"""Per-example predictions of a classifier: class probabilities and labels, and what follows
from them example by example (correctness, loss, margin).

The built-in ``accuracy`` and ``loss`` evaluators return them on request
(``BuiltinEvaluator.predict``); their task scores are unchanged: the accuracy is the mean of
``correct`` and the loss the mean of ``loss`` (in float64 here, float32 sums there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Predictions:
    """Softmax probabilities ``probs`` [n, classes] (float64) and integer ``labels`` [n] of the
    n examples of one task's data file, in file order."""

    probs: torch.Tensor
    labels: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.probs.shape[1])

    def true_probs(self) -> torch.Tensor:
        """p_y, the probability of each example's label."""
        return self.probs.gather(1, self.labels[:, None])[:, 0]

    def correct(self) -> torch.Tensor:
        """Whether the argmax class is the label (the first of equal maxima, like argmax)."""
        return self.probs.argmax(1) == self.labels

    def loss(self) -> torch.Tensor:
        """Cross-entropy −log p_y."""
        return -self.true_probs().log()

    def onehot(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.labels, self.classes).to(self.probs.dtype)

    def el2n(self) -> torch.Tensor:
        """‖p − onehot(y)‖₂ (Paul et al., 2021), for one model."""
        return (self.probs - self.onehot()).norm(dim=1)

    def margin(self) -> torch.Tensor:
        """m = p_y − max_{c≠y} p_c (undertraining App. H.1)."""
        others = self.probs.scatter(1, self.labels[:, None], -torch.inf)
        return self.true_probs() - others.max(1).values
