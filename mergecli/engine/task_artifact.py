"""The task-conditional artifact that mask methods (emr, tall_masks) write instead of one model.

The folder; each part is a standard safetensors folder, sharded like a model::

    artifact.json   manifest: kind, method, task names, per-tensor scales, sizes
    base/           θ0: every tensor of the reference model, in the output dtype
    unified/        the unified task vector of every merged tensor, in the output dtype
    masks/<t>/      task t's masks: one bit per element, packed little-endian into uint8
    config.json, tokenizer files, README.md, merge_report.json, merge_report.md

Task t's merged tensor is ``θ0 + scale_t · (mask_t ⊙ unified)``, computed in float32; tensors
without a unified vector are the base's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.engine.layout import Shard, files_bytes, plan_shards
from mergecli.engine.outputs import Card, Target, Written
from mergecli.engine.read_plan import TensorPlan
from mergecli.engine.writer import ShardWriter
from mergecli.methods import TaskMasks, TensorInputs

MANIFEST = "artifact.json"
KIND = "task_masks"
BASE, UNIFIED, MASKS = "base", "unified", "masks"

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class TaskArtifactLayout:
    """Every shard of an artifact, decided from the plan."""

    tasks: list[str]
    base: list[Shard]
    unified: list[Shard]
    masks: list[Shard]
    """The layout of each task's masks."""
    model_bytes: int
    """Bytes of one model's files in the output dtype: the unit of the artifact's size."""
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        """Bytes of the weight files: base, unified vector and every task's masks."""
        masks = len(self.tasks) * files_bytes(self.masks, self.metadata)
        return (
            files_bytes(self.base, self.metadata) + files_bytes(self.unified, self.metadata) + masks
        )

    @property
    def size_in_models(self) -> float:
        return self.nbytes / self.model_bytes


def packed_numel(numel: int) -> int:
    return (numel + 7) // 8


def plan_task_artifact(
    tensors: list[TensorSpec],
    merged: list[TensorSpec],
    tasks: list[str],
    shard_size: int,
    model_bytes: int,
    metadata: dict[str, str],
) -> TaskArtifactLayout:
    """The layout of an artifact holding ``tensors`` in its base and ``merged`` as unified
    vectors and masks."""
    packed: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        (name, (packed_numel(int(np.prod(shape))),), torch.uint8) for name, shape, _ in merged
    ]
    return TaskArtifactLayout(
        tasks,
        plan_shards(tensors, shard_size),
        plan_shards(merged, shard_size),
        plan_shards(packed, shard_size),
        model_bytes,
        metadata,
    )


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as one bit per element, little-endian within each byte (uint8, 1-D)."""
    bits = mask.reshape(-1).to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that ``pack_mask`` packed."""
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def task_weight(
    base: torch.Tensor, unified: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """One task's tensor ``θ0 + scale · (mask ⊙ unified)``, computed in float32, in θ0's dtype."""
    delta = unified.float() * mask
    if scale is not None:
        delta *= scale
    return (base.float() + delta).to(base.dtype)


@dataclass
class StoredTaskTensor:
    """One merged tensor as the artifact stores it."""

    base: torch.Tensor
    unified: torch.Tensor
    masks: list[torch.Tensor]
    scales: list[float] | None

    @classmethod
    def of(cls, base: torch.Tensor, value: TaskMasks, dtype: torch.dtype) -> StoredTaskTensor:
        return cls(
            base.to(dtype),
            value.unified.to(dtype),
            [pack_mask(m) for m in value.masks],
            value.scales,
        )


@dataclass
class TaskMaskArtifact:
    """The output plug-in of mask methods (emr, tall_masks): a task-conditional artifact."""

    layout: TaskArtifactLayout
    merged_rows = True
    copied_rows = True
    reads_base = False
    stores_result = False

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def summary(self) -> dict[str, Any]:
        return {
            "shards": len(self.layout.base),
            "artifact_tasks": self.layout.tasks,
            "artifact_size_in_models": self.layout.size_in_models,
        }

    def memory_error(self) -> str | None:
        return (
            f"merge_method: '{self.layout.metadata['mergecli_method']}' writes a task-mask "
            "artifact, not one model: run it into a folder"
        )

    @property
    def card(self) -> Card:
        return Card(
            "Task-mask artifact",
            "This folder is not one model: it holds the base, a unified task vector and one-bit "
            f"masks per task (tasks: {', '.join(self.layout.tasks)}); `mergecli export FOLDER "
            "--task NAME --output DIR` writes one task's model. It was made",
        )

    def open(self, folder: Path, target: Target) -> TaskArtifactWriter:
        return TaskArtifactWriter(folder, self.layout, target)


class TaskArtifactWriter:
    """Streams an artifact's tensors into its shards, then writes the manifest."""

    def __init__(self, folder: Path, layout: TaskArtifactLayout, target: Target) -> None:
        self.folder = folder
        self.layout = layout
        self.target = target
        self.method = target.method
        self.base = ShardWriter(_mkdir(folder / BASE), layout.base, layout.metadata)
        self.unified = ShardWriter(_mkdir(folder / UNIFIED), layout.unified, layout.metadata)
        self.masks = [
            ShardWriter(_mkdir(folder / MASKS / str(t)), layout.masks, layout.metadata)
            for t in range(len(layout.tasks))
        ]
        self.scales: dict[str, list[float]] = {}

    @property
    def writers(self) -> list[ShardWriter]:
        return [self.base, self.unified, *self.masks]

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers)

    def merged(
        self, tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
    ) -> tuple[Written, dict[str, Any]]:
        assert isinstance(merged, TaskMasks) and inputs.base is not None
        return [(tensor.name, StoredTaskTensor.of(inputs.base, merged, tensor.out_dtype))], {}

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        return [(tensor.name, value)]

    def write(self, name: str, value: torch.Tensor | StoredTaskTensor) -> None:
        """A copied tensor goes to the base only; a merged one everywhere."""
        if isinstance(value, torch.Tensor):
            self.base.write(name, value)
            return
        self.base.write(name, value.base)
        self.unified.write(name, value.unified)
        for writer, mask in zip(self.masks, value.masks, strict=True):
            writer.write(name, mask)
        if value.scales is not None:
            self.scales[name] = value.scales

    def summary(self) -> dict[str, Any]:
        """What the artifact holds, and its size on disk in units of one model."""
        return {
            "kind": KIND,
            "method": self.method,
            "tasks": self.layout.tasks,
            "bytes": self.layout.nbytes,
            "model_bytes": self.layout.model_bytes,
            "size_in_models": self.layout.size_in_models,
        }

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Close every shard, write the manifest and the model files."""
        for writer in self.writers:
            writer.finish()
        summary = {k: v for k, v in self.summary().items() if k != "kind"}
        manifest = {"mergecli_artifact": KIND, "version": 1, **summary, "scales": self.scales}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self.target.copy_model_files(self.folder)
        section = self.summary()
        return {"artifact": section}, markdown(section)


def markdown(artifact: dict[str, Any]) -> list[str]:
    """The report's Markdown section of an artifact."""
    from mergecli.report import human_bytes

    return [
        "## Task-mask artifact",
        "",
        f"Tasks: {', '.join(artifact['tasks'])}. Size on disk: "
        f"{human_bytes(artifact['bytes'])} = {artifact['size_in_models']:.3f} models of "
        f"{human_bytes(artifact['model_bytes'])}. The cosine above is taken with the unified "
        "task vector.",
        "",
    ]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
