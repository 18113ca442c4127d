"""Training the next expert from the init model (TIME §2.2, steps Init → Train): a command.

``temporal.train`` is a template with {init} (the folder to start from: θ0, θ_{t−1} or
EMA_{t−1}), {output} (the folder to write the expert to), {task} (step t's model name), {step}
and {model} (the recipe's models[t−1] entry, e.g. where its data lives). It runs without a shell
unless it uses shell syntax, like ``evaluate.command``; on success {output} must be a
checkpoint folder.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import EvaluationError, RecipeError
from mergecli.evaluate.command import SHELL_SYNTAX


@dataclass(frozen=True)
class TrainRequest:
    """Train step ``step``'s expert (task ``task``) from ``init`` into ``output``."""

    step: int
    task: str
    init: Path
    output: Path
    model: Path


Trainer = Callable[[TrainRequest], Path]
"""Trains one expert and returns its folder."""


def command_trainer(template: str) -> Trainer:
    """A Trainer that runs ``template`` once per step (errors name the step and the stderr)."""
    shell = bool(SHELL_SYNTAX & set(template))
    try:
        argv = shlex.split(template)
    except ValueError as exc:
        raise RecipeError(f"temporal.train: {exc}", key="temporal.train") from None
    if not argv:
        raise RecipeError("temporal.train: empty command", key="temporal.train")

    def train(request: TrainRequest) -> Path:
        values = {
            "{init}": str(request.init),
            "{output}": str(request.output),
            "{task}": request.task,
            "{step}": str(request.step),
            "{model}": str(request.model),
        }

        def fill(text: str, quote: bool) -> str:
            for key, value in values.items():
                text = text.replace(key, shlex.quote(value) if quote else value)
            return text

        command: str | list[str] = fill(template, True) if shell else [fill(a, False) for a in argv]
        where = f"temporal.train (step {request.step}, {request.task})"
        request.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(command, shell=shell, capture_output=True, text=True)
        except FileNotFoundError:
            raise EvaluationError(f"{where}: program '{argv[0]}' not found") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or [""]
            raise EvaluationError(f"{where}: exit status {done.returncode}: {lines[-1][:300]}")
        if not any(request.output.glob("*.safetensors")):
            raise EvaluationError(f"{where}: wrote no safetensors into {request.output}")
        return request.output

    return train
