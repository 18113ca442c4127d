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
their own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts.flex import KIND, MANIFEST
from mergecli.engine.layout import plan_shards, tensor_bytes
from mergecli.engine.output import copy_model_files
from mergecli.engine.plan import TensorPlan
from mergecli.engine.task_artifact import packed_numel
from mergecli.engine.writer import ShardWriter
from mergecli.flex.blocks import Block
from mergecli.flex.order import Group, Partition
from mergecli.flex.plan import FlexPlan


@dataclass(frozen=True)
class Part:
    """One stored tensor: its key, layout, and what it holds (role, group, task)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    """"shared", "base", "weights", "unified" or "mask"."""
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


class FlexWriter:
    """Streams one size's stored tensors into its shards; then the manifest."""

    def __init__(
        self,
        folder: Path,
        shared: list[TensorPlan],
        blocks: list[Block],
        partition: Partition,
        masks: bool,
        shard_bytes: int,
    ) -> None:
        self.folder = folder
        self.blocks = blocks
        self.partition = partition
        self.parts: dict[str, list[Part]] = {
            t.name: [Part(t.name, t.shape, t.out_dtype, "shared")] for t in shared
        }
        for block, groups in zip(blocks, partition, strict=True):
            for tensor in block.tensors:
                self.parts[tensor.name] = tensor_parts(tensor, groups, masks)
        specs = [(p.key, p.shape, p.dtype) for parts in self.parts.values() for p in parts]
        self.stored_bytes = sum(tensor_bytes(shape, dtype) for _, shape, dtype in specs)
        self.writer = ShardWriter(folder, plan_shards(specs, shard_bytes), {KIND: "1"})
        self.scales: dict[Group, dict[str, list[float]]] = {}

    def write(self, name: str, stored: Stored, scales: dict[Group, list[float]]) -> None:
        """Write tensor ``name``'s parts from the values computed for every size."""
        for part in self.parts[name]:
            self.writer.write(part.key, stored[part.source])
            if part.role == "unified" and part.group in scales:
                self.scales.setdefault(part.group, {})[name] = scales[part.group]

    def finish(self, plan: FlexPlan, info: dict[str, Any]) -> dict[str, Any]:
        """Close the shards, write ``flex.json`` and the model files; returns the manifest."""
        self.writer.finish()
        tasks = plan.tasks
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
        manifest = {
            "mergecli_artifact": KIND,
            "version": 1,
            "tasks": tasks,
            **info,
            "stored_bytes": self.stored_bytes,
            "tensor_order": list(self.parts),
            "shared": shared,
            "blocks": blocks,
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        merge = plan.merge
        copy_model_files(
            merge.reference.path,
            merge.tokenizer_folder,
            self.folder,
            merge.out_dtype,
            merge.vocabulary,
        )
        return manifest
