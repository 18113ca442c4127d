"""Reading FlexMerge artifacts (written by ``mergecli.flex``; layout in ``mergecli.flex.artifact``).

Each task's tensor is either stored as is (a tensor outside the blocks, the task's own head,
or its group's copy of a block) or, for a mask method's multi-member group, rebuilt as
``θ0 + scale_t · (mask_t ⊙ unified)`` in float32 and cast to the stored dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts import read_manifest, register_artifact
from mergecli.engine.task_artifact import task_weight, unpack_mask
from mergecli.sources import Checkpoint

MANIFEST = "flex.json"
KIND = "flex"


class FlexArtifact:
    """An open FlexMerge artifact: tensors are read lazily, one at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.tasks: list[str] = manifest["tasks"]
        self.store = Checkpoint(path, f"{path}: flex artifact")
        self.shared: dict[str, str] = manifest["shared"]
        self.heads: dict[str, dict[str, str]] = manifest.get("heads", {})
        self.block_of: dict[str, dict[str, Any]] = {
            name: block for block in manifest["blocks"] for name in block["tensors"]
        }

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensor_order"])

    def group_of(self, task: str, name: str) -> dict[str, Any]:
        """The group of tensor ``name``'s block that holds ``task``."""
        block = self.block_of[name]
        return next(g for g in block["groups"] if task in g["tasks"])

    def _spec_key(self, name: str) -> str:
        if name in self.shared:
            return self.shared[name]
        if name in self.heads:
            return next(iter(self.heads[name].values()))
        block = self.block_of[name]
        if block["base"]:
            return block["base"][name]
        return block["groups"][0]["tensors"][name]

    def tensor_spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.store.info(self._spec_key(name))
        return info.shape, info.dtype

    def stored_key(self, task: str, name: str) -> str | None:
        """The key holding task's tensor as is (None: rebuilt from base, unified and mask)."""
        if name in self.shared:
            return self.shared[name]
        if name in self.heads:
            return self.heads[name][task]
        return self.group_of(task, name).get("tensors", {}).get(name)

    def task_tensor(self, task: str, name: str) -> torch.Tensor:
        """Task ``task``'s tensor ``name`` in the stored dtype."""
        key = self.stored_key(task, name)
        if key is not None:
            return self.store.read(key)
        group = self.group_of(task, name)
        base = self.store.read(self.block_of[name]["base"][name])
        mask = unpack_mask(self.store.read(group["masks"][task][name]), tuple(base.shape))
        scales = group["scales"].get(name)
        scale = scales[group["tasks"].index(task)] if scales is not None else None
        return task_weight(base, self.store.read(group["unified"][name]), mask, scale)

    def model_files(self) -> Path:
        return self.path


@register_artifact
def open_flex(path: Path) -> FlexArtifact | None:
    """The artifact in ``path`` when it holds a FlexMerge manifest ``flex.json``."""
    manifest = read_manifest(path, MANIFEST, KIND)
    return None if manifest is None else FlexArtifact(path, manifest)
