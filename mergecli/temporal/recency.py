"""Recency-biased weights of ``deploy: all`` (TIME App. D.1, reversed in App. D.2).

The paper names the schemes (logarithmic, quadratic, exponential, cubic: "assigning higher
weights to more recent tasks") but prints no formula; these are mergecli's. After step t the
experts i = 1..t (oldest first) get

    w_i = g(i) / Σ_j g(j),   g(i) = ln(1 + i) | i² | 2^i | i³

and ``recency_reversed`` gives w_i = g(t + 1 − i) / Σ_j g(j) (the older experts weigh more).
``uniform`` keeps the method's default weights (every expert 1), the offline merge.
"""

from __future__ import annotations

import math

SCHEMES = {
    "log": lambda i: math.log1p(i),
    "quadratic": lambda i: float(i * i),
    "exponential": lambda i: 2.0**i,
    "cubic": lambda i: float(i**3),
}


def recency_weights(scheme: str, count: int, reverse: bool = False) -> list[float] | None:
    """Weights of ``count`` experts, oldest first, summing to 1; None for ``uniform``."""
    if scheme == "uniform":
        return None
    g = SCHEMES[scheme]
    raw = [g(i) for i in range(1, count + 1)]
    if reverse:
        raw.reverse()
    total = math.fsum(raw)
    return [value / total for value in raw]
