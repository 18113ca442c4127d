"""Evaluators that run a user command: a template with {model}, {task} and {data}.

The command prints a number, or a JSON object with a ``score`` field (the last line that parses
counts). It runs without a shell unless the template uses shell syntax (pipes, redirections,
``&&``, ``$VAR``); then every substituted value is quoted.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

from mergecli.errors import EvaluationError, RecipeError
from mergecli.evaluate.tasks import Task
from mergecli.progress import CountBar
from mergecli.recipe import EvaluateSection

SHELL_SYNTAX = set("|&;<>()$`*?~")


class CommandEvaluator:
    """Scores a checkpoint folder by running ``evaluate.command`` once per task."""

    in_memory = False

    def __init__(self, section: EvaluateSection) -> None:
        assert section.command is not None
        self.template = section.command
        self.higher_is_better = (
            True if section.higher_is_better is None else section.higher_is_better
        )
        self.timeout = section.timeout
        self.shell = bool(SHELL_SYNTAX & set(self.template))
        if not self.shell:
            try:
                self.argv = shlex.split(self.template)
            except ValueError as exc:
                raise RecipeError(f"evaluate.command: {exc}", key="evaluate.command") from None
            if not self.argv:
                raise RecipeError("evaluate.command: empty command", key="evaluate.command")

    def command(self, model: Path, task: Task) -> list[str] | str:
        """The argv (or shell line) for one model and task."""
        values = {"{model}": str(model), "{task}": task.name, "{data}": str(task.data or "")}

        def fill(text: str, quote: bool) -> str:
            for key, value in values.items():
                text = text.replace(key, shlex.quote(value) if quote else value)
            return text

        return fill(self.template, True) if self.shell else [fill(a, False) for a in self.argv]

    def score(
        self, source: Path, tasks: list[Task], bar: CountBar | None = None
    ) -> dict[str, float]:
        """Run the command for each task on a checkpoint folder."""
        bar = bar or CountBar()
        handle = bar.add(f"command on {source.name}", len(tasks))
        scores = {}
        for task in tasks:
            scores[task.name] = self._run(self.command(source, task), task)
            bar.advance(handle)
        bar.done(handle)
        return scores

    def _run(self, command: list[str] | str, task: Task) -> float:
        where = f"evaluate.command (task {task.name})"
        try:
            done = subprocess.run(
                command,
                shell=self.shell,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise EvaluationError(f"{where}: program '{command[0]}' not found") from None
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"{where}: no result after {self.timeout} s") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or [""]
            raise EvaluationError(f"{where}: exit status {done.returncode}: {lines[-1][:300]}")
        value = parse_score(done.stdout)
        if value is None:
            tail = (done.stdout.strip().splitlines() or ["nothing"])[-1][:200]
            raise EvaluationError(
                f"{where}: printed no number or JSON object with a 'score' (last line: {tail!r})"
            )
        return value


def parse_score(stdout: str) -> float | None:
    """The score a command printed: the whole output or its last parseable line, as a number
    or a JSON object's ``score``."""
    for text in [stdout, *reversed(stdout.strip().splitlines())]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = value.get("score")
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None
