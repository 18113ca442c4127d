"""One compiled loop (numba) over a task vector and the merged delta: the report's sums."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def row_sums(x: np.ndarray, d: np.ndarray) -> tuple[float, float, np.int64, np.int64, np.int64]:
    """Σ x², Σ x·d (float64, summed in vector lanes), #x≠0, #(x≠0 ∧ d≠0), #(sign x = sign d ≠ 0)."""
    sq = dot = 0.0
    nonzero = both = same = np.int64(0)
    for j in range(x.shape[0]):
        xj = np.float64(x[j])
        dj = np.float64(d[j])
        sq += xj * xj
        dot += xj * dj
        nonzero += np.int64(xj != 0.0)
        both += np.int64((xj != 0.0) & (dj != 0.0))
        same += np.int64(((xj > 0.0) & (dj > 0.0)) | ((xj < 0.0) & (dj < 0.0)))
    return sq, dot, nonzero, both, same
