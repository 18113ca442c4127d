"""Temporal merging (TIME, "How to merge multimodal models over time?"): experts arrive one after
another and are folded into a state folder with any registered merging method f.

Notation: θ0 the base, θt the expert of step t = 1, 2, ..., w the EMA weight (``ema_weight``,
0 < w ≤ 1, default 0.5; larger w favours the new expert). The paper's Eq. 1 applied with f:

    EMA_0 = θ0
    EMA_t = f(base θ0, models [EMA_{t−1}, θt], per-model weights [1 − w, w])

so for ``linear`` (weight averaging) EMA_t = (1 − w)·EMA_{t−1} + w·θt, and for
``task_arithmetic`` τ(EMA_t) = λ·((1 − w)·τ(EMA_{t−1}) + w·τt) with τ(x) = x − θ0. Every
method's own rules apply to the pair (TIES trims the EMA's task vector too, and its disjoint mean
ignores zeros, so EMA_1 = θ0 + λ·τ̂1 whatever w). Random masks of step t's EMA merge are drawn
with a seed derived from (recipe seed, t).

After step t:

- init (the model expert t + 1 trains from): ``base`` θ0 | ``latest`` θt | ``ema`` EMA_t;
- deploy (the model to serve): ``latest`` θt | ``ema`` EMA_t (the paper's θ^EMA_{t+1}) |
  ``all`` f(θ0, [θ1, ..., θt]) with the method's default weights (``linear``: the mean).

Before the first expert both are θ0. ``init: ema, deploy: ema`` is the paper's Best-in-TIME.
``recency`` weighs deploy: all towards recent experts (``recency``), ``task_vectors: previous``
takes the EMA merge's task vectors against EMA_{t−1}, and ``evaluate_over_time`` scores every
step of every (init, deploy) pair (``timeline``).
"""

from mergecli.temporal.fold import StepResult, add_expert, init_state
from mergecli.temporal.recency import recency_weights
from mergecli.temporal.replay import ReplayResult, replay
from mergecli.temporal.state import status
from mergecli.temporal.timeline import PAIRS, evaluate_over_time, time_metrics
from mergecli.temporal.train import TrainRequest, command_trainer

__all__ = [
    "PAIRS",
    "ReplayResult",
    "StepResult",
    "TrainRequest",
    "add_expert",
    "command_trainer",
    "evaluate_over_time",
    "init_state",
    "recency_weights",
    "replay",
    "status",
    "time_metrics",
]
