"""Interference figures of a group of entries, from its streaming sums.

Definitions (upcycling paper, Appendix I; ``METHODS.md``), with Mt the top-k support of expert t:

- ``sign_conflict`` [s][t] = 100 · |{i ∈ Ms ∪ Mt : τs,i τt,i < 0}| / |Ms ∪ Mt|;
- ``overlap`` [s][t] = 100 · |Ms ∩ Mt| / |Ms| (row s, column t: not symmetric);
- ``magnitude_ratio`` [s][t] = mean over Ms ∩ Mt of max(abs τs, abs τt) / min(abs τs, abs τt);
- ``cosine`` [s][t] of the full (unpruned) task vectors;
- ``variance`` = mean over ∪t Mt of (1/M) Σt τ̃t² (a plain number, not a percentage);
- ``ties_sign_conflict`` = 100 · share of ∪t Mt where the non-zero τ̃t disagree in sign;
- ``tall_selfish`` / ``tall_catastrophic`` = 100 · share of all entries where exactly one / no
  TALL mask ``mt = [abs(τt) > λ·abs(τMTL − τt)]`` is on (unchanged entries count as catastrophic);
- ``norm`` = ‖τt‖₂ and ``kept`` = 100 · |Mt| / n per expert.

A pairwise figure comes as ``{"matrix": [[...]], "mean": ...}``; the mean is over the ordered
pairs s ≠ t where the figure is defined (the same as over unordered pairs when symmetric).
Undefined values (an empty denominator) are None.
"""

from __future__ import annotations

from typing import Any

import torch

from mergecli.analyze.counts import Counts

PAIRWISE = ("sign_conflict", "overlap", "magnitude_ratio", "cosine")
GLOBAL = ("variance", "ties_sign_conflict", "tall_selfish", "tall_catastrophic")


def _ratio(num: torch.Tensor, den: torch.Tensor, scale: float = 1.0) -> list[Any]:
    """num / den elementwise as nested lists, None where den is 0."""
    value = scale * num / torch.where(den > 0, den, 1.0)
    return torch.where(den > 0, value, torch.nan).tolist()


def _pairwise(matrix: list[list[float]]) -> dict[str, Any]:
    clean = [[None if v != v else v for v in row] for row in matrix]  # NaN → None
    pairs = [
        v for s, row in enumerate(clean) for t, v in enumerate(row) if s != t and v is not None
    ]
    return {"matrix": clean, "mean": sum(pairs) / len(pairs) if pairs else None}


def _share(num: float, den: float, scale: float = 100.0) -> float | None:
    return scale * num / den if den else None


def figures(c: Counts) -> dict[str, Any]:
    """Every interference figure of one group (see the module docstring)."""
    support = c.support
    union = support[:, None] + support[None, :] - c.both
    ratio_sum = c.ratio_sum + torch.diag(support)  # each self-ratio is 1
    sq = c.gram.diagonal()
    norms = sq.sqrt()
    return {
        "parameters": c.numel,
        "sign_conflict": _pairwise(_ratio(c.conflict, union, 100.0)),
        "overlap": _pairwise(_ratio(c.both, support[:, None].expand_as(c.both), 100.0)),
        "magnitude_ratio": _pairwise(_ratio(ratio_sum, c.both)),
        "cosine": _pairwise(_ratio(c.gram, norms[:, None] * norms[None, :])),
        "variance": _share(c.trimmed_sq, c.experts * c.active, 1.0),
        "ties_sign_conflict": _share(c.ties_conflict, c.active),
        "tall_selfish": _share(c.tall_selfish, c.numel),
        "tall_catastrophic": _share(c.tall_catastrophic, c.numel),
        "norm": norms.tolist(),
        "kept": [_share(float(s), c.numel) for s in support],
    }
