"""The finite-value guard: NaN or Inf in an input as read, or in a merged tensor, is an error
naming the tensor, its file and the expert (or a warning under ``on_nonfinite: warn``).

One ``torch.isfinite(t).all()`` per piece, on the pass that reads or merges it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mergecli.errors import NonFiniteError

Mode = Literal["error", "warn"]


def count_nonfinite(t: torch.Tensor) -> int:
    """Entries of ``t`` that are NaN or ±Inf (0 for non-floating tensors)."""
    if not t.dtype.is_floating_point or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(
    t: torch.Tensor,
    tensor: str,
    source: str,
    file: Path | str | None,
    mode: Mode,
    warnings: list[str],
) -> None:
    """Raise NonFiniteError (``mode`` error) or note one warning per tensor and source."""
    bad = count_nonfinite(t)
    if not bad:
        return
    where = f" in {file}" if file else ""
    message = f"{source}: tensor '{tensor}'{where} holds {bad} NaN/Inf value(s)"
    if mode == "error":
        raise NonFiniteError(
            message + " (set on_nonfinite: warn to merge anyway)", tensor=tensor, source=source
        )
    note = message + "; merged anyway (on_nonfinite: warn)"
    if not any(w.startswith(f"{source}: tensor '{tensor}'") for w in warnings):
        warnings.append(note)
