"""Task-mask artifacts (``emr``, ``tall_masks``): base + unified task vector + packed masks.

Task t's tensor is rebuilt as ``θ0 + scale_t · (mask_t ⊙ unified)`` in float32 and cast to the
base's dtype; the layout is described in ``mergecli.engine.task_artifact``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts import read_manifest, register_artifact
from mergecli.engine.task_artifact import (
    BASE,
    KIND,
    MANIFEST,
    MASKS,
    UNIFIED,
    task_weight,
    unpack_mask,
)
from mergecli.sources import Checkpoint


class TaskMaskArtifact:
    """An open task-mask artifact: tensors are read lazily, one at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.tasks: list[str] = manifest["tasks"]
        self.scales: dict[str, list[float]] = manifest.get("scales", {})
        self.base = Checkpoint(path / BASE, f"{path}: base")
        self.unified = Checkpoint(path / UNIFIED, f"{path}: unified task vector")
        self.masks = [
            Checkpoint(path / MASKS / str(t), f"{path}: masks of task {name}")
            for t, name in enumerate(self.tasks)
        ]

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def tensor_spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.base.info(name)
        return info.shape, info.dtype

    def task_tensor(self, task: str, name: str) -> torch.Tensor:
        """Task ``task``'s tensor ``name``, in the stored dtype (a private copy)."""
        base = self.base.read(name)
        if name not in self.unified:
            return base.clone()
        t = self.tasks.index(task)
        mask = unpack_mask(self.masks[t].read(name), tuple(base.shape))
        scale = self.scales[name][t] if name in self.scales else None
        return task_weight(base, self.unified.read(name), mask, scale)

    def model_files(self) -> Path:
        return self.path


@register_artifact
def open_task_masks(path: Path) -> TaskMaskArtifact | None:
    """The artifact in ``path`` when its manifest says it is a task-mask artifact."""
    manifest = read_manifest(path, MANIFEST, KIND)
    return None if manifest is None else TaskMaskArtifact(path, manifest)
