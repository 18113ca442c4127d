"""Tensors of other sources under new names: one stream reads the same stored tensor from
several sources (an MoE's experts, the adapters an Arrow folder copies)."""

from __future__ import annotations

import torch

from mergecli.sources.checkpoint import TensorInfo
from mergecli.sources.readable import Readable


class Renamed:
    """Each name read as ``(source, stored name)``."""

    def __init__(self, label: str, names: dict[str, tuple[Readable, str]]) -> None:
        self.label = label
        self.names = names
        self.row_reads = all(source.row_reads for source, _ in names.values())

    def info(self, name: str) -> TensorInfo:
        source, stored = self.names[name]
        return source.info(stored)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        source, stored = self.names[name]
        return source.read(stored, rows)
