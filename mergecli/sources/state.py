"""Tensors held in memory under their names (a trained model's weights), read like a
checkpoint so that the runner streams them into an output."""

from __future__ import annotations

from pathlib import Path

import torch

from mergecli.errors import ShapeError
from mergecli.sources.checkpoint import TensorInfo


class StateDict:
    """A state dict as a ``Readable``: ``info`` from the tensors, ``read`` a view of them."""

    row_reads = True

    def __init__(self, label: str, tensors: dict[str, torch.Tensor]) -> None:
        self.label = label
        self.tensors = tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ShapeError(f"{self.label}: holds no tensor '{name}'", tensor=name)
        tensor = self.tensors[name]
        return TensorInfo(tuple(tensor.shape), tensor.dtype, Path(self.label))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor if rows is None else tensor[rows[0] : rows[1]]
