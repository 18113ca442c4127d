"""Channel Merging (Zhang et al., 2025), the baseline FlexMerge is compared with.

In every block, the experts' block task vectors are clustered into the same number K of groups
by spherical k-means (cosine distance), computed exactly from the block's Gram matrix: the
cosine of a vector with a cluster's centroid (the mean of its members' unit vectors) is
``Σ_j∈c Cij / sqrt(Σ_i,j∈c Cij)``. Initialisation is k-means++ from a generator seeded by the
recipe's seed and the block index; ``RESTARTS`` seeded restarts keep the clustering with the
highest total cosine. A cluster that empties takes the member farthest from its centroid. The
deployed size is K (weight-only methods store one block per group).
"""

from __future__ import annotations

import numpy as np

from mergecli.flex.order import Group
from mergecli.flex.similarity import cosines

RESTARTS = 10
ITERATIONS = 100


def _centroid_cosines(cos: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """M×K cosines of each unit vector with each cluster's centroid."""
    out = np.zeros((cos.shape[0], k))
    for c in range(k):
        members = np.flatnonzero(labels == c)
        norm = float(np.sqrt(max(cos[np.ix_(members, members)].sum(), 0.0)))
        if norm > 0:
            out[:, c] = cos[:, members].sum(1) / norm
    return out


def _fill_empty(cos: np.ndarray, labels: np.ndarray, k: int) -> None:
    for c in range(k):
        if not (labels == c).any():
            scores = _centroid_cosines(cos, labels, k)[np.arange(len(labels)), labels]
            movable = [
                i for i in np.argsort(scores, kind="stable") if (labels == labels[i]).sum() > 1
            ]
            labels[movable[0]] = c


def _kmeans_once(cos: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    m = cos.shape[0]
    centers = [int(rng.integers(m))]
    while len(centers) < k:
        distance = np.clip(1.0 - cos[:, centers].max(1), 0.0, None)
        distance[centers] = 0.0
        total = distance.sum()
        probs = distance / total if total > 0 else np.where(np.isin(np.arange(m), centers), 0, 1.0)
        centers.append(int(rng.choice(m, p=probs / probs.sum())))
    labels = np.argmax(cos[:, centers], axis=1)
    labels[centers] = np.arange(k)
    for _ in range(ITERATIONS):
        _fill_empty(cos, labels, k)
        new = np.argmax(_centroid_cosines(cos, labels, k), axis=1)
        _fill_empty(cos, new, k)
        if np.array_equal(new, labels):
            break
        labels = new
    score = float(_centroid_cosines(cos, labels, k)[np.arange(m), labels].sum())
    return score, labels


def kmeans_groups(gram: np.ndarray, k: int, seed: int, block: int) -> list[Group]:
    """K groups of the block's experts, ordered by their smallest member."""
    cos = cosines(gram)
    rng = np.random.default_rng([seed, block])
    best: tuple[float, np.ndarray] | None = None
    for _ in range(RESTARTS):
        score, labels = _kmeans_once(cos, k, rng)
        if best is None or score > best[0] + 1e-12:
            best = (score, labels)
    assert best is not None
    labels = best[1]
    return sorted(tuple(int(i) for i in np.flatnonzero(labels == c)) for c in range(k))


def channel_partition(grams: list[np.ndarray], k: int, seed: int) -> list[list[Group]]:
    """The groups of every block for K clusters per block."""
    return [kmeans_groups(g, k, seed, b) for b, g in enumerate(grams)]
