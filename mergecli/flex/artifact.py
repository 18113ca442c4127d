"""The FlexMerge artifact: one folder per deployed size.

    flex.json            manifest: tasks, method, options, achieved size, and per block (in
                         model order) its tensors and groups: member tasks and stored keys
    model*.safetensors   every distinct stored tensor once, sharded like a model
    config.json, tokenizer files, flex_report.json, flex_report.png

A stored key is ``<tensor>@g<j>`` for group j's copy of a tensor (an expert's weights for a
singleton group, the method's merge for a larger one). Mask methods store a multi-member group
as ``<tensor>@g<j>.unified`` and ``<tensor>@g<j>.mask<t>`` (one bit per element, packed) with
per-task scales in the manifest, and the block's base once as ``<tensor>@base``; task t's tensor
is then ``θ0 + scale_t · (mask_t ⊙ unified)``. Tensors outside the blocks are stored once under
their own name; task-specific heads once per task, as ``<tensor>@task<t>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts.flex import KIND, MANIFEST
from mergecli.engine.layout import plan_shards, tensor_bytes
from mergecli.engine.outputs import Target
from mergecli.engine.plan import TensorPlan
from mergecli.engine.task_artifact import packed_numel
from mergecli.engine.writer import ShardWriter
from mergecli.flex.blocks import Block
from mergecli.flex.order import Group, Partition


@dataclass(frozen=True)
class Part:
    """One stored tensor: its key, layout, and what it holds (role, group, task)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    """"shared", "head", "base", "weights", "unified" or "mask"."""
    group: Group | None = None
    task: int | None = None

    @property
    def source(self) -> tuple[str, Group | None, int | None]:
        return self.role, self.group, self.task


def tensor_parts(tensor: TensorPlan, groups: list[Group], masks: bool) -> list[Part]:
    """The stored parts of one block tensor for a block's groups, in writing order."""
    name, shape, dtype = tensor.name, tensor.shape, tensor.out_dtype
    multi = masks and any(len(g) > 1 for g in groups)
    parts = [Part(f"{name}@base", shape, dtype, "base")] if multi else []
    for j, group in enumerate(groups):
        if masks and len(group) > 1:
            parts.append(Part(f"{name}@g{j}.unified", shape, dtype, "unified", group))
            packed = (packed_numel(tensor.numel),)
            parts += [
                Part(f"{name}@g{j}.mask{t}", packed, torch.uint8, "mask", group, t) for t in group
            ]
        else:
            parts.append(Part(f"{name}@g{j}", shape, dtype, "weights", group))
    return parts


Stored = dict[tuple[str, Group | None, int | None], torch.Tensor]
"""The tensors one input tensor gives, by (role, group, task), shared by every size."""


def artifact_parts(
    shared: list[TensorPlan],
    heads: list[TensorPlan],
    tasks: int,
    blocks: list[Block],
    partition: Partition,
    masks: bool,
) -> dict[str, list[Part]]:
    """Every input tensor's stored parts, in writing order: tensors outside the blocks once,
    task-specific heads once per task, each block tensor per group of the block."""
    parts = {t.name: [Part(t.name, t.shape, t.out_dtype, "shared")] for t in shared}
    for t in heads:
        parts[t.name] = [
            Part(f"{t.name}@task{k}", t.shape, t.out_dtype, "head", None, k) for k in range(tasks)
        ]
    for block, groups in zip(blocks, partition, strict=True):
        for tensor in block.tensors:
            parts[tensor.name] = tensor_parts(tensor, groups, masks)
    return parts


@dataclass
class FlexArtifact:
    """The output of one deployed size: its stored tensors, manifest and model files (fed by
    FlexMerge's merge pass, ``flex/run.GroupMerge``)."""

    shared: list[TensorPlan]
    heads: list[TensorPlan]
    blocks: list[Block]
    partition: Partition
    masks: bool
    shard_bytes: int
    tasks: list[str]
    info: dict[str, Any]
    """The manifest's description of the run (strategy, method, target, size...)."""

    @property
    def nbytes(self) -> int:
        parts = artifact_parts(
            self.shared, self.heads, len(self.tasks), self.blocks, self.partition, self.masks
        )
        return sum(tensor_bytes(p.shape, p.dtype) for ps in parts.values() for p in ps)

    def open(self, folder: Path, target: Target) -> FlexWriter:
        return FlexWriter(folder, self, target)


class FlexWriter:
    """Streams one size's stored tensors into its shards; then the manifest."""

    def __init__(self, folder: Path, artifact: FlexArtifact, target: Target) -> None:
        self.folder = folder
        self.artifact = artifact
        self.target = target
        self.blocks = artifact.blocks
        self.partition = artifact.partition
        self.parts = artifact_parts(
            artifact.shared,
            artifact.heads,
            len(artifact.tasks),
            artifact.blocks,
            artifact.partition,
            artifact.masks,
        )
        specs = [(p.key, p.shape, p.dtype) for parts in self.parts.values() for p in parts]
        self.stored_bytes = sum(tensor_bytes(shape, dtype) for _, shape, dtype in specs)
        self.writer = ShardWriter(folder, plan_shards(specs, artifact.shard_bytes), {KIND: "1"})
        self.scales: dict[Group, dict[str, list[float]]] = {}

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def write(self, name: str, value: tuple[Stored, dict[Group, list[float]]]) -> None:
        """Write tensor ``name``'s parts from the values computed for every size (the stored
        tensors by role, group and task; the groups' mask scales)."""
        stored, scales = value
        for part in self.parts[name]:
            self.writer.write(part.key, stored[part.source])
            if part.role == "unified" and part.group in scales:
                self.scales.setdefault(part.group, {})[name] = scales[part.group]

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Close the shards, write ``flex.json`` and the model files; the manifest (under
        ``manifest``)."""
        self.writer.finish()
        tasks = self.artifact.tasks
        keys = {name: {p.source: p.key for p in parts} for name, parts in self.parts.items()}
        blocks = []
        for block, groups in zip(self.blocks, self.partition, strict=True):
            names = [t.name for t in block.tensors]
            base = {
                n: keys[n][("base", None, None)] for n in names if ("base", None, None) in keys[n]
            }
            entries = []
            for group in groups:
                entry: dict[str, Any] = {"tasks": [tasks[i] for i in group]}
                if ("weights", group, None) in keys[names[0]]:
                    entry["tensors"] = {n: keys[n]["weights", group, None] for n in names}
                else:
                    entry["unified"] = {n: keys[n]["unified", group, None] for n in names}
                    entry["masks"] = {
                        tasks[t]: {n: keys[n]["mask", group, t] for n in names} for t in group
                    }
                    entry["scales"] = self.scales.get(group, {})
                entries.append(entry)
            blocks.append(
                {"name": block.name, "tensors": names, "base": base or None, "groups": entries}
            )
        shared = {n: n for n, parts in self.parts.items() if parts[0].role == "shared"}
        heads = {
            n: {tasks[p.task]: p.key for p in parts if p.task is not None}
            for n, parts in self.parts.items()
            if parts[0].role == "head"
        }
        manifest = {
            "mergecli_artifact": KIND,
            "version": 1,
            "tasks": tasks,
            **self.artifact.info,
            "stored_bytes": self.stored_bytes,
            "tensor_order": list(self.parts),
            "shared": shared,
            "heads": heads,
            "blocks": blocks,
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self.target.copy_model_files(self.folder)
        return {"manifest": manifest}, []
