"""Which tensors FlexMerge merges, keeps per task, or stores once.

- **Heads** (``flex.heads``: regular expressions searched in tensor names): task-specific
  heads, as the paper keeps its classification heads. They are not merged: the artifact stores
  every task's own head (the expert's tensor) and the size leaves them out.
- **Untouched**: tensors that no expert changes, known from the headers when every expert is a
  PEFT adapter (a tensor none of them adapts). They are stored once, like buffers, and the
  size's unit becomes the adapter modules (FlexMerge's Fig. 4a): one copy of the tensors the
  adapters change.
- Everything else that is merged goes into the blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from mergecli.engine.plan import MergePlan, TensorPlan
from mergecli.errors import RecipeError
from mergecli.sources import Adapter


@dataclass
class Parts:
    """The plan's tensors split by how FlexMerge stores them."""

    blocked: list[TensorPlan]
    """Merged block by block."""
    shared: list[TensorPlan]
    """Stored once: buffers, tensors an ``on_missing: base`` keeps, untouched tensors (as
    copies of the base)."""
    heads: list[TensorPlan]
    """Stored once per task, each task's own."""
    adapters: bool
    """Whether every expert is a PEFT adapter (the size's unit is then the adapter modules)."""


def head_patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled = []
    for i, text in enumerate(patterns):
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise RecipeError(
                f"flex.heads[{i}]: invalid pattern '{text}': {exc}", key=f"flex.heads[{i}]"
            ) from None
    return compiled


def split_parts(merge: MergePlan, heads: list[str]) -> Parts:
    """Heads, untouched tensors and blocked tensors of a merge plan; a head pattern that
    matches no merged tensor is an error."""
    patterns = head_patterns(heads)
    merged = [t for t in merge.tensors if t.merge]
    for i, pattern in enumerate(patterns):
        if not any(pattern.search(t.name) for t in merged):
            raise RecipeError(
                f"flex.heads[{i}]: '{pattern.pattern}' matches no merged tensor of the model",
                key=f"flex.heads[{i}]",
            )
    adapters = [e for e in merge.experts if isinstance(e, Adapter)]
    every = len(adapters) == len(merge.experts)
    blocked, shared, head = [], [t for t in merge.tensors if not t.merge], []
    for tensor in merged:
        if any(p.search(tensor.name) for p in patterns):
            head.append(tensor)
        elif every and not any(a.changes(tensor.name) for a in adapters):
            shared.append(replace(tensor, merge=False))
        else:
            blocked.append(tensor)
    return Parts(blocked, shared, head, every)
