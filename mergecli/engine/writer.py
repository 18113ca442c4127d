"""Streams tensors into pre-laid-out safetensors shards."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch

from mergecli.engine.layout import INDEX_NAME, Shard, index_json


class ShardWriter:
    """Writes tensors, in layout order, into the shards of ``folder``.

    Each shard's header is written when its first tensor arrives; tensors must come in the
    layout's order with the layout's shape and dtype.
    """

    def __init__(self, folder: Path, shards: list[Shard], metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.metadata = metadata
        self._order = [(s, i) for s in shards for i in range(len(s.names))]
        self._next = 0
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, i = self._order[self._next]
        if shard.names[i] != name:
            raise RuntimeError(f"writer expected {shard.names[i]!r}, got {name!r}")
        if tuple(tensor.shape) != shard.shapes[i] or tensor.dtype != shard.dtypes[i]:
            raise RuntimeError(
                f"{name}: layout says {shard.shapes[i]} {shard.dtypes[i]}, "
                f"got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if i == 0:
            self._close()
            self._file = (self.folder / shard.file).open("wb")
            header = shard.header(self.metadata)
            self._file.write(header)
            self.bytes_written += len(header)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._next += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard and write the index when there are several shards."""
        self._close()
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            (self.folder / INDEX_NAME).write_text(index_json(self.shards))
