"""The merge order: which two groups of which block merge at each step.

Every block starts with M singleton groups. A linkage scores two groups of a block from the
block's Gram matrix: ``min`` (complete linkage, the paper's default: the lowest cosine between a
member of one and a member of the other), ``max``, ``avg`` (mean over member pairs), ``merged``
(cosine of the groups' mean task vectors, exact from the Gram matrix whatever the merging
method) and ``random`` (a seeded uniform score per pair of groups). ``greedy`` merges the
best-scoring pair of any block at each step; ``left_to_right`` / ``right_to_left`` merge blocks
fully, one after the other in model order (pairs inside a block still by the linkage).

Ties break deterministically: the earlier block, then the pair whose groups' smallest members
come first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mergecli.flex.similarity import cosines

Group = tuple[int, ...]
Partition = list[list[Group]]
"""Per block, its groups (sorted tuples of expert indices), ordered by their smallest member."""


@dataclass(frozen=True)
class Step:
    """One merge: groups ``a`` and ``b`` of block ``block``, and their linkage score."""

    block: int
    a: Group
    b: Group
    similarity: float


def linkage_score(
    kind: str, gram: np.ndarray, cos: np.ndarray, a: Group, b: Group, key: tuple[int, int]
) -> float:
    """The similarity of groups a and b of one block under a linkage."""
    pairs = cos[np.ix_(a, b)]
    if kind == "min":
        return float(pairs.min())
    if kind == "max":
        return float(pairs.max())
    if kind == "avg":
        return float(pairs.mean())
    if kind == "merged":
        ga, gb = gram[np.ix_(a, a)].sum(), gram[np.ix_(b, b)].sum()
        denom = float(np.sqrt(max(ga, 0.0) * max(gb, 0.0)))
        return float(gram[np.ix_(a, b)].sum()) / denom if denom > 0 else 0.0
    if kind == "random":
        seed, block = key
        text = f"{seed}\x00{block}\x00{a}\x00{b}".encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") / 2**64
    raise ValueError(f"unknown linkage {kind!r}")


def _best_pair(
    kind: str, gram: np.ndarray, cos: np.ndarray, groups: list[Group], key: tuple[int, int]
) -> tuple[float, int, int] | None:
    best: tuple[float, int, int] | None = None
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            score = linkage_score(kind, gram, cos, groups[i], groups[j], key)
            if best is None or score > best[0]:
                best = (score, i, j)
    return best


def merge_order(grams: list[np.ndarray], linkage: str, order: str, seed: int) -> list[Step]:
    """Every step from M groups per block down to one group per block."""
    m = grams[0].shape[0]
    coss = [cosines(g) for g in grams]
    groups: Partition = [[(k,) for k in range(m)] for _ in grams]
    best = [
        _best_pair(linkage, g, c, groups[b], (seed, b))
        for b, (g, c) in enumerate(zip(grams, coss, strict=True))
    ]
    sequence = list(range(len(grams)))
    if order == "right_to_left":
        sequence.reverse()
    steps: list[Step] = []
    while True:
        if order == "greedy":
            choice = None
            for b, pair in enumerate(best):
                if pair is not None and (choice is None or pair[0] > best[choice][0]):  # type: ignore[index]
                    choice = b
        else:
            choice = next((b for b in sequence if best[b] is not None), None)
        if choice is None:
            return steps
        pair = best[choice]
        assert pair is not None
        score, i, j = pair
        a, b_ = groups[choice][i], groups[choice][j]
        reported = score if linkage != "random" else float(coss[choice][np.ix_(a, b_)].min())
        steps.append(Step(choice, a, b_, reported))
        merged = tuple(sorted(a + b_))
        groups[choice] = sorted([g for g in groups[choice] if g not in (a, b_)] + [merged])
        best[choice] = _best_pair(
            linkage, grams[choice], coss[choice], groups[choice], (seed, choice)
        )


def partition_after(steps: list[Step], count: int, blocks: int, m: int) -> Partition:
    """The groups of every block after the first ``count`` steps."""
    groups: Partition = [[(k,) for k in range(m)] for _ in range(blocks)]
    for step in steps[:count]:
        merged = tuple(sorted(step.a + step.b))
        groups[step.block] = sorted(
            [g for g in groups[step.block] if g not in (step.a, step.b)] + [merged]
        )
    return groups
