"""Tensor reductions that accumulate in float64 without a float64 copy of a whole tensor."""

from __future__ import annotations

import torch

CHUNK = 1 << 22
"""Elements per chunk: bounds the float64 temporaries to 32 MiB whatever the tensor size."""


def _chunks(*tensors: torch.Tensor):
    flats = [t.reshape(-1) for t in tensors]
    for start in range(0, flats[0].numel(), CHUNK):
        yield [f[start : start + CHUNK].double() for f in flats]


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b accumulated in float64."""
    return float(sum(torch.dot(x, y) for x, y in _chunks(a, b)) if a.numel() else 0.0)


def sumsq64(a: torch.Tensor) -> float:
    """Σ a² accumulated in float64."""
    return dot64(a, a)


def cosine64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in float64; 0 when either vector is zero."""
    denom = (sumsq64(a) * sumsq64(b)) ** 0.5
    return dot64(a, b) / denom if denom > 0 else 0.0


def abs_sum64(a: torch.Tensor) -> float:
    """Σ abs(a) accumulated in float64."""
    return float(sum(x.abs().sum() for (x,) in _chunks(a)) if a.numel() else 0.0)


def gram64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The M×M matrix of Σ ai·aj over M same-shaped tensors, in float64 on the CPU.

    Chunks of CHUNK elements in all (CHUNK / M per tensor) are copied into one reused float64
    buffer, which bounds the temporaries to 32 MiB.
    """
    flats = [t.reshape(-1) for t in tensors]
    n, m = flats[0].numel(), len(flats)
    step = max(1, CHUNK // m)
    device = flats[0].device
    out = torch.zeros(m, m, dtype=torch.float64, device=device)
    buffer = torch.empty(m, min(step, n), dtype=torch.float64, device=device)
    for start in range(0, n, step):
        chunk = buffer[:, : min(step, n - start)]
        for row, flat in zip(chunk, flats, strict=True):
            row.copy_(flat[start : start + step])
        out.addmm_(chunk, chunk.T)
    return out.cpu()
