"""Lazy access to a local Hugging Face checkpoint folder, tensor by tensor."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import safe_open

from mergecli.errors import SourceError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A folder with ``*.safetensors`` shards (optionally indexed), read lazily.

    Only headers are read on construction; ``read`` returns one tensor, or some of its rows.
    Each read opens its shard anew with ``safe_open``, so the pages of the shard's memory map
    are released with the tensor read from it and the resident memory stays that of the tensors
    in flight, whatever the checkpoint's size.
    ``.bin`` (pickle) shards are refused unless ``allow_bin``, and then loaded with
    ``weights_only=True`` and mmap.
    """

    delta = False
    """Whether ``read`` returns task vectors (adapters) rather than weights."""
    row_reads = True
    """Whether reading some rows costs only those rows (so tensors may stream in row chunks)."""
    origin: str | None = None
    """What the recipe (or an adapter's config) named: a path or a Hub id."""
    _remapped: Mapping[str, tuple[TensorInfo, Callable[[int, int], torch.Tensor]]] = (
        MappingProxyType({})
    )
    """Tensors shown over a new vocabulary (``remap``): their stored header and row reader."""

    def __init__(self, path: Path, label: str, allow_bin: bool = False) -> None:
        self.path = path
        self.label = label
        if not path.is_dir():
            raise SourceError(f"{label}: '{path}' is not a folder", path=path)
        self.files = self._weight_files(allow_bin)
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in self.files:
            self._read_header(file)

    def _weight_files(self, allow_bin: bool) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(
                    f"{self.label}: {index} names missing shard {missing[0]}", path=index
                )
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        bins = sorted(self.path.glob("*.bin"))
        if bins and not allow_bin:
            raise SourceError(
                f"{self.label}: '{self.path}' holds only pickle (.bin) weights; convert them to "
                "safetensors or opt in with allow_bin: true (loaded with weights_only=True)",
                path=self.path,
            )
        if bins:
            return bins
        raise SourceError(
            f"{self.label}: no *.safetensors weights in '{self.path}'", path=self.path
        )

    def _read_header(self, file: Path) -> None:
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            self._bins[file] = state
            for name, t in state.items():
                self._infos[name] = TensorInfo(tuple(t.shape), t.dtype, file)
            return
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise SourceError(f"{self.label}: cannot read '{file}': {exc}", path=file) from None
        with handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not iterable)
                piece = handle.get_slice(name)
                code = piece.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise SourceError(
                        f"{self.label}: tensor '{name}' in {file} has dtype {code}", path=file
                    )
                shape = tuple(piece.get_shape())
                self._infos[name] = TensorInfo(shape, SAFETENSORS_DTYPES[code], file)

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def _local(self, file: Path) -> Path:
        """The shard's path once it is on disk (at once for a local folder)."""
        return file

    def remap(self, name: str, rows: int, read: Callable[[int, int], torch.Tensor]) -> None:
        """Show tensor ``name`` with ``rows`` rows, rows ``start:stop`` computed by
        ``read(start, stop)`` (from ``read_stored``): a tensor over a merge's new vocabulary
        (``mergecli.vocab``). ``read_stored`` still reads what the file holds."""
        stored = self.stored_info(name)
        self._remapped = {**self._remapped, name: (stored, read)}
        self._infos[name] = TensorInfo((rows, *stored.shape[1:]), stored.dtype, stored.file)

    def stored_info(self, name: str) -> TensorInfo:
        """The header of ``name`` as stored in its file (``info`` unless remapped)."""
        return self._remapped[name][0] if name in self._remapped else self._infos[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor (or its rows ``start:stop``), on the CPU, in its stored dtype. The result
        may be modified in place: a whole tensor lives in a private (copy-on-write) mapping of
        its own, rows are copied out of the file, and a ``.bin`` tensor is copied."""
        if name in self._remapped:
            start, stop = rows or (0, self._infos[name].shape[0])
            return self._remapped[name][1](start, stop)
        return self.read_stored(name, rows)

    def read_stored(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``read`` of what the file holds, whether or not ``name`` is remapped."""
        info = self.stored_info(name)
        if info.file in self._bins:
            tensor = self._bins[info.file][name]
            return (tensor if rows is None else tensor[rows[0] : rows[1]]).clone()
        with safe_open(str(self._local(info.file)), framework="pt", device="cpu") as handle:
            if rows is None or not info.shape:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows[0] : rows[1]]

    def config(self) -> dict[str, Any] | None:
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise SourceError(f"{self.label}: {file} is not valid JSON: {exc}", path=file) from None

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        """A SHA-256 over the shards' names, sizes and headers (cheap; not the whole data)."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            with file.open("rb") as fh:
                digest.update(fh.read(1 << 16))
        return digest.hexdigest()[:16]
