"""The state's manifest, ``temporal.json``: settings, the sequence of experts and current models.

The manifest is the single source of truth of a state folder and is only ever replaced whole,
atomically (``os.replace``): a step is committed exactly when its manifest lands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mergecli.errors import SourceError
from mergecli.recipe import Recipe, TemporalSection, recipe_from_dict

MANIFEST = "temporal.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepRecord(_Strict):
    """One folded expert: where it was, what it looked like, and (keep_steps) its deploy model."""

    expert: str
    """Absolute path of the expert's folder (experts are referenced, never copied)."""
    name: str
    fingerprint: str
    """``Checkpoint.fingerprint()`` when the expert was added; a later mismatch is an error."""
    deploy: str | None = None
    """With keep_steps: this step's deploy model (state-relative, or the expert's own path)."""


class Manifest(_Strict):
    """Everything a state needs to continue: settings, experts so far, current merged models."""

    mergecli_temporal: Literal[1] = 1
    settings: dict[str, Any]
    """Recipe keys without ``models`` and ``output``, paths absolute, ``temporal`` filled in."""
    base_fingerprint: str
    steps: list[StepRecord] = []
    ema: str | None = None
    """State-relative folder of EMA_t (t = len(steps)); None at step 0, where EMA_0 is the base."""
    merged: str | None = None
    """State-relative folder of the deploy-all merge of the current step."""

    @property
    def temporal(self) -> TemporalSection:
        return TemporalSection.model_validate(self.settings["temporal"])

    @property
    def base(self) -> Path:
        return Path(self.settings["base_model"])

    def recipe(
        self, models: list[dict[str, Any]], seed: int | None = None, base: str | None = None
    ) -> Recipe:
        """The merge recipe of these models over the state's base (or ``base``, the model the
        task vectors are taken against), method and parameters."""
        data = {key: value for key, value in self.settings.items() if key != "temporal"}
        data["models"] = models
        if seed is not None:
            data["seed"] = seed
        if base is not None:
            data["base_model"] = base
        return recipe_from_dict(data, source=MANIFEST)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a state folder; one-line MergeError when it is missing or damaged."""
    path = folder / MANIFEST
    if not path.is_file():
        if not folder.exists():
            raise SourceError(
                f"state '{folder}' does not exist (create it with 'temporal init')", path=folder
            )
        raise SourceError(f"'{folder}' is not a temporal state (no {MANIFEST})", path=folder)
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise SourceError(f"{path}: damaged temporal manifest: {first}", path=path) from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest beside its target, flush it to disk, then swap it in atomically."""
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    with tmp.open("w") as fh:
        fh.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
