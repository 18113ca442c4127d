"""One task of an artifact as a source the runner reads (``export``)."""

from __future__ import annotations

import torch

from mergecli.artifacts import Artifact
from mergecli.sources import TensorInfo


class TaskSource:
    """Task ``task``'s tensors, each rebuilt whole when read, in the stored dtype."""

    row_reads = False

    def __init__(self, artifact: Artifact, task: str) -> None:
        self.artifact = artifact
        self.task = task
        self.label = f"{artifact.path}: task {task}"

    def info(self, name: str) -> TensorInfo:
        shape, dtype = self.artifact.tensor_spec(name)
        return TensorInfo(shape, dtype, self.artifact.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.artifact.task_tensor(self.task, name)
        return tensor if rows is None else tensor[rows[0] : rows[1]]
