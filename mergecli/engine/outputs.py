"""Output plug-ins: where a stream's tensors go.

Every output kind is an ``Output``: planned from headers (its layout and size), opened on a
folder with a ``Target`` (where its config and tokenizer files come from, the weights' dtype,
the method), it returns an ``OutputWriter`` that owns what it writes: its files, its extra
files (config, tokenizer, adapter config, manifest), its section of the report. The runner
writes, on the writer thread, what the stream's passes hand it. Outputs a merge plan holds
(``MergeOutput``: ``ModelFolder`` and ``InMemory`` here, ``LoraAdapter`` in
``engine/lora_output.py``, ``TaskMaskArtifact`` in ``engine/task_artifact.py``) give a
``PieceWriter``, which the merge's ``Store`` pass asks what to write for each merged or copied
piece. Others: ``TensorCopies`` (here; an exported task), ``SparseMoe`` and ``ArrowMoe``
(``moe/sparse_output.py``, ``moe/arrow_output.py``), ``FlexArtifact`` (``flex/artifact.py``,
one per deployed size, fed by FlexMerge's own pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mergecli.chat_template import resolve_chat_template, write_chat_template
from mergecli.engine.layout import Shard
from mergecli.engine.output import copy_model_files
from mergecli.engine.read_plan import TensorPlan
from mergecli.engine.writer import ShardWriter
from mergecli.methods import TaskMasks, TensorInputs

if TYPE_CHECKING:
    from mergecli.vocab import Vocabulary

Written = list[tuple[str, Any]]
"""What an output writes for one piece: (stored name, value) in layout order."""


@dataclass(frozen=True)
class Target:
    """What an output is told about the run that fills it, besides its own layout."""

    out_dtype: torch.dtype
    """The weights' dtype (written into config.json)."""
    model_files: Path | None = None
    """The model whose config and generation config the output carries (None: none)."""
    tokenizer: Path | None = None
    """The folder whose tokenizer files the output carries."""
    method: str = ""
    """The merging method, for files that name it."""
    chat_template: str | None = None
    """The recipe's ``chat_template`` (a Jinja text or ``auto``)."""
    inputs: tuple[Path, ...] = ()
    """The input folders an ``auto`` chat template is taken from."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keys set in the copied config.json (a slices merge's new depth)."""
    vocabulary: Vocabulary | None = None
    """A merged vocabulary (``tokenizer_source: union``, the ``tokenizer`` section): its
    tokenizer is written instead of the copied one, its row count as the config's vocab_size."""

    def copy_model_files(self, folder: Path) -> None:
        """config.json (dtype updated), generation config, tokenizer files, chat template."""
        if self.model_files is not None:
            copy_model_files(
                self.model_files,
                self.tokenizer or self.model_files,
                folder,
                self.out_dtype,
                self.config,
                self.vocabulary,
            )
        template = resolve_chat_template(self.chat_template, self.inputs)
        if template is not None:
            write_chat_template(folder, template)


@dataclass
class Card:
    """The model card's title, its opening sentence and the library that loads the output."""

    title: str
    what: str
    library: str = "transformers"


class OutputWriter(Protocol):
    """An output being written into one folder (or into memory)."""

    @property
    def bytes_written(self) -> int:
        """Bytes stored so far."""
        ...

    def write(self, name: str, value: Any) -> None:
        """Store one value (called on the writer thread, in order)."""
        ...

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Close the files, write the extra ones; the report's section (by key) and its
        Markdown lines."""
        ...


class PieceWriter(OutputWriter, Protocol):
    """An output writer that says what to write for each piece of a stream (``Store``)."""

    def merged(
        self, tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
    ) -> tuple[Written, dict[str, Any]]:
        """What to write for one merged piece, and figures for the tensor's report entry."""
        ...

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        """What to write for one copied piece."""
        ...


class Output(Protocol):
    """An output kind, planned from headers."""

    @property
    def nbytes(self) -> int:
        """Bytes of the weight files."""
        ...

    def open(self, folder: Path, target: Target) -> OutputWriter: ...


class RowPolicy(Protocol):
    """Which tensors a consumer takes in row pieces."""

    merged_rows: bool
    """Whether merged tensors may come in row pieces (when the method is elementwise)."""
    copied_rows: bool
    """Whether copied tensors may come in row pieces."""


class MergeOutput(Output, RowPolicy, Protocol):
    """An output a merge plan holds: its writer takes merged and copied pieces."""

    reads_base: bool
    """Whether the base is read for every merged tensor (an adapter is a change of it)."""
    stores_result: bool
    """Whether the writer stores a merged piece as the method returns it, in the output dtype
    (the merge then offers the method that dtype: ``TensorInputs.out_dtype``)."""

    @property
    def card(self) -> Card:
        """What the model card says the output is."""
        ...

    def summary(self) -> dict[str, Any]:
        """The plan summary's figures of this output (``shards`` first)."""
        ...

    def memory_error(self) -> str | None:
        """Why the merge cannot be held in memory as one model, or None when it can."""
        ...

    def open(self, folder: Path, target: Target) -> PieceWriter: ...


MODEL_CARD = Card("Merged model", "This model was merged")


@dataclass
class ModelFolder:
    """A standard model folder: safetensors shards, index, config and tokenizer files."""

    shards: list[Shard]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """Keys set in the copied config.json (a slices merge's new depth)."""
    vocabulary: Vocabulary | None = None
    """A merged vocabulary (``tokenizer_source: union``, the ``tokenizer`` section): its
    tokenizer is written instead of the copied one, its row count as the config's vocab_size."""
    merged_rows = True
    copied_rows = True
    reads_base = False
    stores_result = True
    card = MODEL_CARD

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def summary(self) -> dict[str, Any]:
        return {"shards": len(self.shards)}

    def memory_error(self) -> str | None:
        return None

    def open(self, folder: Path, target: Target) -> ModelWriter:
        target = replace(target, config={**target.config, **self.config})
        return ModelWriter(ShardWriter(folder, self.shards, self.metadata), folder, target)


class WholeModel:
    """What an output holding one model stores: each tensor under its name, a merged one in
    the output dtype, a copied one as read."""

    def merged(
        self, tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
    ) -> tuple[Written, dict[str, Any]]:
        assert isinstance(merged, torch.Tensor)
        return [(tensor.name, merged.to(tensor.out_dtype))], {}

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        return [(tensor.name, value)]


class Sharded:
    """An output writer that stores its values in safetensors shards."""

    def __init__(self, shards: ShardWriter, folder: Path) -> None:
        self.shards = shards
        self.folder = folder

    @property
    def bytes_written(self) -> int:
        return self.shards.bytes_written

    def write(self, name: str, value: Any) -> None:
        self.shards.write(name, value)


@dataclass
class TensorCopies:
    """Copied tensors in safetensors shards, each in its planned dtype, with the target's
    model files (an exported task)."""

    shards: list[Shard]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def open(self, folder: Path, target: Target) -> CopyWriter:
        return CopyWriter(ShardWriter(folder, self.shards, self.metadata), folder, target)


class ModelWriter(WholeModel, Sharded):
    """Writes a model folder: every tensor in the output dtype, then config, tokenizer and chat
    template."""

    def __init__(self, shards: ShardWriter, folder: Path, target: Target) -> None:
        super().__init__(shards, folder)
        self.target = target

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        self.shards.finish()
        self.target.copy_model_files(self.folder)
        return {}, []


class CopyWriter(ModelWriter):
    """A model folder of copied tensors, each in its planned dtype (an exported task, a sparse
    MoE's tensors)."""

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        return [(tensor.name, value.to(tensor.out_dtype))]


class InMemory(WholeModel):
    """A model's state dict in memory (a merge's on the plan's device, for evaluation; whole
    tensors as read, ``engine/whole.read_whole``)."""

    merged_rows = False
    copied_rows = False
    reads_base = False
    stores_result = True
    nbytes = 0
    card = MODEL_CARD

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.bytes_written = 0

    def summary(self) -> dict[str, Any]:
        return {"shards": 0}

    def memory_error(self) -> str | None:
        return None

    def open(self, folder: Path, target: Target) -> InMemory:
        return self

    def write(self, name: str, value: Any) -> None:
        self.state[name] = value
        self.bytes_written += value.nbytes

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return {}, []
