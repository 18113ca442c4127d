"""Output plug-ins: where a merge's tensors go.

An output is planned from headers (its layout and size) and owns what it writes: its files,
its extra files (config, tokenizer, adapter config, manifest), its section of the report and
its model card. The merge pass hands it each merged or copied piece; the runner writes what it
returns on the writer thread. Outputs: ``ModelFolder`` (here), ``LoraAdapter``
(``engine/lora_output.py``), ``TaskMaskArtifact`` (``engine/task_artifact.py``), ``InMemory``
(here, for evaluation); FlexMerge's artifact is written by its own pass (``flex/run.py``).
Writers without a merge: ``CopyWriter`` (here; an exported task, a sparse MoE), the Arrow
folder's ``AdapterCopies`` (``moe/arrow_output.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    from mergecli.engine.plan import MergePlan

Written = list[tuple[str, Any]]
"""What an output writes for one piece: (stored name, value) in layout order."""


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

    def merged(
        self, tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
    ) -> tuple[Written, dict[str, Any]]:
        """What to write for one merged piece, and figures for the tensor's report entry."""
        ...

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        """What to write for one copied piece."""
        ...

    def write(self, name: str, value: Any) -> None:
        """Store one value (called on the writer thread, in order)."""
        ...

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Close the files, write the extra ones; the report's section (by key) and its
        Markdown lines."""
        ...


class RowPolicy(Protocol):
    """Which tensors a consumer takes in row pieces."""

    merged_rows: bool
    """Whether merged tensors may come in row pieces (when the method is elementwise)."""
    copied_rows: bool
    """Whether copied tensors may come in row pieces."""


class Output(RowPolicy, Protocol):
    """An output kind, planned from headers."""

    reads_base: bool
    """Whether the base is read for every merged tensor (an adapter is a change of it)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the weight files."""
        ...

    def summary(self) -> dict[str, Any]:
        """The plan summary's figures of this output (``shards`` first)."""
        ...

    def memory_error(self) -> str | None:
        """Why the merge cannot be held in memory as one model, or None when it can."""
        ...

    def open(self, folder: Path, plan: MergePlan) -> OutputWriter: ...

    def card(self, plan: MergePlan) -> Card: ...


@dataclass
class ModelFolder:
    """A standard model folder: safetensors shards, index, config and tokenizer files."""

    shards: list[Shard]
    metadata: dict[str, str] = field(default_factory=dict)
    merged_rows = True
    copied_rows = True
    reads_base = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def summary(self) -> dict[str, Any]:
        return {"shards": len(self.shards)}

    def memory_error(self) -> str | None:
        return None

    def open(self, folder: Path, plan: MergePlan) -> ModelWriter:
        return ModelWriter(ShardWriter(folder, self.shards, self.metadata), folder, plan)

    def card(self, plan: MergePlan) -> Card:
        return Card("Merged model", "This model was merged")


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


class CopyWriter(WholeModel, Sharded):
    """Writes copied tensors into safetensors shards, each in its planned dtype (an exported
    task, a sparse MoE's tensors)."""

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        return [(tensor.name, value.to(tensor.out_dtype))]

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        self.shards.finish()
        return {}, []


class ModelWriter(WholeModel, Sharded):
    """Writes a model folder: every tensor in the output dtype, then config and tokenizer."""

    def __init__(self, shards: ShardWriter, folder: Path, plan: MergePlan) -> None:
        super().__init__(shards, folder)
        self.plan = plan

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        self.shards.finish()
        copy_model_files(
            self.plan.reference.path,
            self.plan.tokenizer_folder,
            self.folder,
            self.plan.out_dtype,
            self.plan.vocabulary,
        )
        sources = [s.path for s in (self.plan.base, *self.plan.experts) if s]
        template = resolve_chat_template(self.plan.recipe.chat_template, sources)
        if template is not None:
            write_chat_template(self.folder, template)
        return {}, []


class InMemory(WholeModel):
    """The merged model's state dict in memory, on the plan's device (evaluation)."""

    merged_rows = False
    copied_rows = False
    reads_base = False
    nbytes = 0

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.bytes_written = 0

    def summary(self) -> dict[str, Any]:
        return {"shards": 0}

    def memory_error(self) -> str | None:
        return None

    def open(self, folder: Path, plan: MergePlan) -> InMemory:
        return self

    def card(self, plan: MergePlan) -> Card:
        return Card("Merged model", "This model was merged")

    def write(self, name: str, value: Any) -> None:
        self.state[name] = value
        self.bytes_written += value.nbytes

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return {}, []
