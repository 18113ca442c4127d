"""One input of a slices merge: a model stacked from layers of several checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from mergecli.sources.checkpoint import Checkpoint, TensorInfo


class Stacked:
    """Each output tensor name read as ``(checkpoint, stored name)``: output layer 12 of a
    slice may be layer 7 of one model, its embeddings those of another. ``path`` is the model
    whose config and tokenizer files the output takes."""

    delta = False
    origin: str | None = None

    def __init__(self, label: str, names: dict[str, tuple[Checkpoint, str]], path: Path) -> None:
        self.label = label
        self.names = names
        self.path = path
        self.row_reads = all(source.row_reads for source, _ in names.values())

    def tensor_names(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def info(self, name: str) -> TensorInfo:
        source, stored = self.names[name]
        return source.info(stored)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        source, stored = self.names[name]
        return source.read(stored, rows)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoints it reads, in order of first use."""
        return list({id(c): c for c, _ in self.names.values()}.values())

    def config(self) -> dict[str, Any] | None:
        return next((c.config() for c in self.checkpoints if c.path == self.path), None)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it reads."""
        return sum(self.info(name).nbytes for name in self.names)

    def fingerprint(self) -> str:
        """A SHA-256 over its checkpoints' fingerprints and the name map."""
        digest = hashlib.sha256()
        for checkpoint in self.checkpoints:
            digest.update(checkpoint.fingerprint().encode())
        for name, (checkpoint, stored) in self.names.items():
            digest.update(f"{name}={checkpoint.path}:{stored};".encode())
        return digest.hexdigest()[:16]
