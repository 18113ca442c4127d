"""Streams tensors into pre-laid-out safetensors shards."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch

from mergecli.engine.layout import Shard, index_json
from mergecli.sources.checkpoint import INDEX_NAME


class ShardWriter:
    """Writes tensors, in layout order, into the shards of ``folder``.

    Each shard's header is written when its first tensor arrives; tensors must come in the
    layout's order with the layout's shape and dtype, whole or as consecutive row chunks.
    """

    def __init__(self, folder: Path, shards: list[Shard], metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.metadata = metadata
        self._order = [(s, i) for s in shards for i in range(len(s.names))]
        self._next = 0
        self._rows = 0
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor, or the next rows of it."""
        shard, i = self._order[self._next]
        if shard.names[i] != name:
            raise RuntimeError(f"writer expected {shard.names[i]!r}, got {name!r}")
        shape = shard.shapes[i]
        got = tuple(tensor.shape)
        whole = got == shape and self._rows == 0
        rows = got[0] if got and not whole else 0
        piece = bool(shape) and got[1:] == shape[1:] and self._rows + rows <= shape[0]
        if tensor.dtype != shard.dtypes[i] or not (whole or piece):
            raise RuntimeError(
                f"{name}: layout says {shape} {shard.dtypes[i]}, got {got} {tensor.dtype}"
                + (f" after {self._rows} rows" if self._rows else "")
            )
        if i == 0 and self._rows == 0:
            self._close()
            self._file = (self.folder / shard.file).open("wb")
            header = shard.header(self.metadata)
            self._file.write(header)
            self.bytes_written += len(header)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.data)
        self.bytes_written += data.nbytes
        self._rows += rows
        if whole or self._rows == shape[0]:
            self._next += 1
            self._rows = 0

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
