"""Artifacts that hold several task models at once (FlexMerge, EMR, TALL masks).

Each kind registers an opener; ``open_artifact`` finds the kind of a folder, and every kind
answers the same questions, so ``export`` and serving never branch on the kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from mergecli.errors import RecipeError, SourceError, did_you_mean


class Artifact(Protocol):
    """A folder that reconstructs a standard checkpoint per task."""

    path: Path

    def task_names(self) -> list[str]: ...
    def tensor_names(self) -> list[str]: ...
    def tensor_spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...
    def task_tensor(self, task: str, name: str) -> torch.Tensor: ...
    def model_files(self) -> Path:
        """The folder holding config and tokenizer files to copy into an export."""
        ...


Opener = Callable[[Path], "Artifact | None"]
_OPENERS: list[Opener] = []


def register_artifact(opener: Opener) -> Opener:
    """Register a function that opens a folder of its kind, or returns None."""
    _OPENERS.append(opener)
    return opener


def read_manifest(path: Path, file: str, kind: str) -> dict[str, Any] | None:
    """The JSON manifest ``file`` of folder ``path`` when it says it is an artifact of ``kind``
    (None when absent or of another kind; invalid JSON is an error)."""
    manifest_file = path / file
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{manifest_file} is not valid JSON: {exc}", path=manifest_file) from None
    return manifest if manifest.get("mergecli_artifact") == kind else None


def open_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"artifact '{path}' is not a folder", path=path)
    for opener in _OPENERS:
        artifact = opener(path)
        if artifact is not None:
            return artifact
    raise SourceError(
        f"'{path}' is not a mergecli artifact (no flex.json or artifact.json)", path=path
    )


def check_task(artifact: Artifact, task: str) -> None:
    names = artifact.task_names()
    if task not in names:
        raise RecipeError(
            f"--task: '{task}' is not a task of {artifact.path}{did_you_mean(task, names)}; "
            f"tasks: {', '.join(names)}",
            key="--task",
        )


def task_state_dict(artifact: Artifact, task: str) -> dict[str, torch.Tensor]:
    """One task's full state dict, in memory."""
    check_task(artifact, task)
    return {name: artifact.task_tensor(task, name) for name in artifact.tensor_names()}


from mergecli.artifacts import flex, task_masks  # noqa: E402,F401  (registration)
