"""The effective noise scale of a training run (optimiser-bias paper, §2, Eq. 3):

    S̃ = η / (B·(1 − μ))

with η the learning rate, B the batch size and μ the momentum (the paper's proxy for the
diffusion strength of SGD, Σ_A's trace taken as constant across runs of one data set).

The three values are read from the run's Hugging Face training metadata, looked for in the
model's folder, then (a run folder) its last ``checkpoint-<step>``, then (a checkpoint) the
run folder above it; the first file that has a value gives it:

- ``training_args.json`` (``TrainingArguments.to_json_string()``): η = ``learning_rate``,
  B = ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` (one device), μ =
  ``momentum`` when present, else ``adam_beta1`` for an Adam-family ``optim`` (β1 is Adam's
  momentum; HF's default optimiser is AdamW);
- ``trainer_state.json``: B = ``train_batch_size``, η = the largest ``learning_rate`` logged
  in ``log_history`` (the peak of the schedule).

Values given explicitly (``--lr``, ``--batch-size``, ``--momentum``) replace what the files say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergecli.analyze.runs import run_checkpoints
from mergecli.errors import RecipeError, SourceError

KEYS = ("learning_rate", "batch_size", "momentum")
OPTIONS = {"learning_rate": "--lr", "batch_size": "--batch-size", "momentum": "--momentum"}


def noise_scale(learning_rate: float, batch_size: float, momentum: float) -> float:
    """S̃ = η / (B·(1 − μ))."""
    return learning_rate / (batch_size * (1.0 - momentum))


def _folders(path: Path) -> list[Path]:
    """Where a model's training metadata may be: itself, its run's last checkpoint, its run."""
    run = run_checkpoints(path)
    folders = [path]
    if run:
        folders.append(run[max(run)])
    if path.name.startswith("checkpoint-") and run_checkpoints(path.parent):
        folders.append(path.parent)
    return folders


def _read(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{file}: invalid JSON: {exc.msg}", path=file) from None
    if not isinstance(data, dict):
        raise SourceError(f"{file}: expected a JSON object", path=file)
    return data


def _from_args(args: dict[str, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    if "learning_rate" in args:
        found["learning_rate"] = float(args["learning_rate"])
    if "per_device_train_batch_size" in args:
        accumulate = args.get("gradient_accumulation_steps", 1)
        found["batch_size"] = float(args["per_device_train_batch_size"]) * float(accumulate)
    if "momentum" in args:
        found["momentum"] = float(args["momentum"])
    elif "adam_beta1" in args and "adam" in str(args.get("optim", "adamw")).lower():
        found["momentum"] = float(args["adam_beta1"])
    return found


def _from_state(state: dict[str, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    if "train_batch_size" in state:
        found["batch_size"] = float(state["train_batch_size"])
    rates = [
        float(e["learning_rate"])
        for e in state.get("log_history", [])
        if isinstance(e, dict) and isinstance(e.get("learning_rate"), int | float)
    ]
    if rates:
        found["learning_rate"] = max(rates)
    return found


def training_hyperparameters(
    name: str, path: Path, given: dict[str, float | None] | None = None
) -> dict[str, Any]:
    """η, B and μ of the run ``name`` at ``path`` (``given`` values first), where each came
    from, and S̃; a missing value is an error naming the run and the key."""
    given = given or {}
    values: dict[str, float] = {k: v for k, v in given.items() if v is not None}
    sources = {k: "given" for k in values}
    for folder in _folders(path):
        for file, reader in (
            ("training_args.json", _from_args),
            ("trainer_state.json", _from_state),
        ):
            if not (folder / file).is_file():
                continue
            for key, value in reader(_read(folder / file)).items():
                if key not in values:
                    values[key] = value
                    sources[key] = str(folder / file)
    for key in KEYS:
        if key not in values:
            raise RecipeError(
                f"{name} ({path}): no {key} in its training metadata (training_args.json or "
                f"trainer_state.json in the model, its run or its last checkpoint); give "
                f"{OPTIONS[key]}",
                key=OPTIONS[key],
            )
    if values["batch_size"] <= 0 or not 0 <= values["momentum"] < 1:
        raise RecipeError(
            f"{name}: S̃ = η / (B(1 − μ)) needs B > 0 and 0 ≤ μ < 1, got B = "
            f"{values['batch_size']:g}, μ = {values['momentum']:g}",
            key="--momentum" if values["batch_size"] > 0 else "--batch-size",
        )
    return {
        **{k: values[k] for k in KEYS},
        "sources": {k: sources[k] for k in KEYS},
        "noise_scale": noise_scale(*(values[k] for k in KEYS)),
    }
