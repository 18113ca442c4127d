"""Output layout: which shard holds each tensor, and the safetensors header of each shard.

The whole layout is known from the plan, so each shard's header is written first and tensor
bytes are streamed after it in plan order: no shard is ever held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from mergecli.sources.checkpoint import DTYPE_CODES


@dataclass
class Shard:
    file: str
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True))

    def header(self, metadata: dict[str, str] | None = None) -> bytes:
        """The safetensors header (length prefix included), padded to 8 bytes."""
        entries: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = tensor_bytes(shape, dtype)
            entries[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def plan_shards(
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int
) -> list[Shard]:
    """Greedy consecutive sharding: a new shard when the next tensor would pass shard_size."""
    shards: list[Shard] = [Shard("")]
    for name, shape, dtype in tensors:
        current = shards[-1]
        if current.names and current.nbytes + tensor_bytes(shape, dtype) > shard_size:
            current = Shard("")
            shards.append(current)
        current.names.append(name)
        current.shapes.append(shape)
        current.dtypes.append(dtype)
    if len(shards) == 1:
        shards[0].file = "model.safetensors"
    else:
        for i, shard in enumerate(shards, 1):
            shard.file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


def index_json(shards: list[Shard]) -> str:
    """``model.safetensors.index.json`` for a sharded output."""
    weight_map = {name: s.file for s in shards for name in s.names}
    total = sum(s.nbytes for s in shards)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes → bytes."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    if unit not in units:
        raise ValueError(f"unknown size unit in {text!r}")
    size = int(float(number) * units[unit])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def files_bytes(shards: list[Shard], metadata: dict[str, str] | None = None) -> int:
    """Bytes on disk of the shards' files, headers included (the index file excluded)."""
    return sum(len(s.header(metadata)) + s.nbytes for s in shards)
