"""The sums behind the per-tensor report, for one piece, in one pass over its entries.

For each task vector τt of a piece and the merged delta δ: Σ τt², Σ δ², Σ τt·δ in float64,
and the counts of entries where τt ≠ 0, where τt·δ ≠ 0 (both non-zero) and where τt·δ > 0
(signs agree). A float32 product is exact in float64, so the counts follow from the same
products as the sums. On the CPU one compiled loop (numba) reads each row once; the float64
sums are reassociated into vector lanes, so they equal a sequential sum up to float64 rounding,
and the counts are exact. Elsewhere (a GPU, bfloat16) the same sums are torch reductions.

Measured on 2 cores for three experts: the compiled loop takes 1.6 ms per million entries, a
torch reduction per statistic 13.6 ms, and a Gram matrix of the stacked rows (one float64 and
one float32 matrix product, the first idea) 15 ms, since BLAS is slow on matrices of 4 rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mergecli.methods import TaskMasks, TensorInputs

BLOCK = 1 << 20
"""Entries per block of the torch path's float64 scratch (bounds its memory)."""
NUMBA_DTYPES = (torch.float32, torch.float64)


class PieceFigures:
    """Report sums piece by piece (the torch path reuses float64 scratch between pieces)."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None

    def __call__(self, inputs: TensorInputs, merged: torch.Tensor | TaskMasks) -> dict[str, Any]:
        """Over one piece: squared norms of the task vectors and of the merged delta (an
        artifact's unified task vector) and their dot products, accumulated in float64; the
        entries where both are non-zero and where their signs also agree; the kept fractions."""
        size = (merged.unified if isinstance(merged, TaskMasks) else merged).numel()
        if inputs.base is None:
            return {"kept": list(inputs.kept), "size": size}
        tvs = [tv.reshape(-1) for tv in inputs.task_vectors()]
        delta = merged.unified if isinstance(merged, TaskMasks) else merged - inputs.base
        delta = delta.reshape(-1)
        m = len(tvs)
        if delta.device.type == "cpu" and delta.dtype in NUMBA_DTYPES:
            sums, counts = _compiled_sums(tvs, delta)
        else:
            sums, counts = self._torch_sums(tvs, delta)
        both = [int(c) for c in counts[m : 2 * m]]
        return {
            "size": size,
            "delta_sq": float(sums[m]),
            "tv_sq": [float(x) for x in sums[:m]],
            "dot": [float(x) for x in sums[m + 1 :]],
            "both": both,
            "same": [int(c) for c in counts[2 * m :]],
            "kept": [
                k if k is not None else int(n) / max(size, 1)
                for k, n in zip(inputs.kept, counts[:m], strict=True)
            ],
        }

    def _torch_sums(
        self, tvs: list[torch.Tensor], delta: torch.Tensor
    ) -> tuple[list[float], list[int]]:
        """The same sums as ``_compiled_sums``, one torch reduction per statistic and block."""
        m, size = len(tvs), delta.numel()
        sums = [0.0] * (2 * m + 1)
        counts = [0.0] * (3 * m)
        for start in range(0, size, BLOCK):
            stop = min(start + BLOCK, size)
            d64, t64 = self._buffers(stop - start, delta.device)
            d64.copy_(delta[start:stop])
            sums[m] += float(d64.dot(d64))
            d_sign = torch.sign(delta[start:stop])
            for t, tv in enumerate(tvs):
                t64.copy_(tv[start:stop])
                sums[t] += float(t64.dot(t64))
                sums[m + 1 + t] += float(t64.dot(d64))
                sign = torch.sign(tv[start:stop])
                counts[t] += float(sign.abs().sum())
                sign *= d_sign  # +1 where the signs agree, -1 where they differ, 0 elsewhere
                agreement = float(sign.sum())
                both = float(sign.abs_().sum())
                counts[m + t] += both
                counts[2 * m + t] += (both + agreement) / 2
        return sums, [round(c) for c in counts]

    def _buffers(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None or self._scratch.shape[1] < n or self._scratch.device != device:
            self._scratch = torch.empty((2, n), dtype=torch.float64, device=device)
        return self._scratch[0, :n], self._scratch[1, :n]


def _compiled_sums(tvs: list[torch.Tensor], delta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[Σ τt²…, Σ δ², Σ τt·δ…] (float64) and [#τt≠0…, #τt·δ≠0…, #τt·δ>0…] (int64)."""
    m = len(tvs)
    sums, counts = np.zeros(2 * m + 1), np.zeros(3 * m, dtype=np.int64)
    d = delta.contiguous().numpy()
    kernel = _kernel()
    for t, tv in enumerate(tvs):
        x = tv.contiguous().numpy()
        sums[t], sums[m + 1 + t], counts[t], counts[m + t], counts[2 * m + t] = kernel(x, d)
    sums[m] = kernel(d, d)[0]
    return sums, counts


def _kernel() -> Any:
    """The compiled loop; numba is imported (and the loop loaded from its cache) on first use."""
    from mergecli.engine.row_sums import row_sums

    return row_sums
