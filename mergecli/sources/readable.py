"""What a stream reads a tensor from, whatever holds it."""

from __future__ import annotations

from typing import Protocol

import torch

from mergecli.sources.checkpoint import TensorInfo


class Readable(Protocol):
    """A checkpoint, an adapter, or a view of tensors (an artifact's task, tensors of other
    sources under new names): names, shapes and dtypes from headers, tensors on request."""

    label: str
    row_reads: bool
    """Whether reading some rows costs only those rows."""

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...
