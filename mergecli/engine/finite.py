"""The finite-value guard: NaN or Inf in an input as read, or in a merged tensor, is an error
naming the tensor, its file and the expert (or a warning under ``on_nonfinite: warn``).

One sum per piece, on the pass that reads or merges it (``count_nonfinite``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch

from mergecli.errors import NonFiniteError

Mode = Literal["error", "warn"]


def count_nonfinite(t: torch.Tensor) -> int:
    """Entries of ``t`` that are NaN or ±Inf (0 for non-floating tensors).

    A finite sum proves every entry finite (a NaN or Inf entry makes any sum NaN or Inf), at
    the cost of one read of the piece and no temporary; only a non-finite sum (a NaN or Inf, or
    an overflowing sum of finite values) pays for the exact count. The sum is taken in the
    tensor's own dtype: torch accumulates bfloat16 and float16 in float32 and rounds once at
    the end (0.06 ms per million bfloat16 entries on one thread here, against 2.1 ms for
    ``sum(dtype=float32)``, which converts every entry first); a sum beyond float16's range
    only costs the exact count."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return 0
    total = t.sum()
    if math.isfinite(float(total)):
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
