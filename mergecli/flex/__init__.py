"""FlexMerge: merge M experts into a deployment of any size between one model and M.

The model is cut into blocks (``blocks``); one streaming pass measures the cosine similarity of
the experts' block task vectors (``similarity``); a greedy order merges the most similar groups
of any block first (``order``), and each target size takes the first state of that order whose
stored bytes fit (``size``). One merge pass writes an artifact per size (``artifact``), from
which ``mergecli export`` rebuilds each task's model and ``serve`` loads all tasks sharing their
common blocks. ``strategy: channel`` is the Channel Merging baseline (``channel``).
"""

from mergecli.flex.plan import FlexPlan, plan_flex
from mergecli.flex.run import FlexResult, SizeResult, run_flex

__all__ = ["FlexPlan", "FlexResult", "SizeResult", "plan_flex", "run_flex"]
