"""The tasks of an ``evaluate:`` section: names, data files, experts; reading the data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.errors import EvaluationError, RecipeError, did_you_mean
from mergecli.recipe import EvalTask, Recipe


@dataclass(frozen=True)
class Task:
    """One evaluation task: its data file (None for a command that needs none) and the index of
    the recipe's model trained for it (None when no model is)."""

    name: str
    data: Path | None
    expert: int | None


def resolve_tasks(recipe: Recipe) -> list[Task]:
    """The tasks of ``recipe.evaluate``.

    ``tasks`` (a list of names or a mapping name → {data, expert}) lists them; otherwise a
    ``data`` path containing ``{task}`` gives one task per model, named after the model, and a
    plain ``data`` path one task named after the file. A task's expert is the model named by
    ``expert``, else the model named like the task.
    """
    section = recipe.evaluate
    if section is None:
        raise RecipeError(
            "evaluate: this recipe has no 'evaluate:' section saying how to score", key="evaluate"
        )
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    if isinstance(section.tasks, list):
        entries = {name: EvalTask() for name in section.tasks}
    elif section.tasks:
        entries = dict(section.tasks)
    elif section.data and "{task}" in section.data:
        entries = {name: EvalTask() for name in names}
    elif section.data:
        entries = {Path(section.data).stem: EvalTask(data=section.data)}
    else:
        entries = {"default": EvalTask()}
    tasks = []
    for name, entry in entries.items():
        key = f"evaluate.tasks.{name}"
        template = entry.data or section.data
        data = recipe.resolve_path(template.replace("{task}", name)) if template else None
        if data is not None and not data.is_file():
            raise RecipeError(f"{key}: data file '{data}' does not exist", key=f"{key}.data")
        if section.metric and data is None:
            raise RecipeError(
                f"{key}: the '{section.metric}' metric needs a data file ('data:')",
                key=f"{key}.data",
            )
        if entry.expert is not None and entry.expert not in names:
            hint = did_you_mean(entry.expert, names)
            raise RecipeError(
                f"{key}.expert: no model is named '{entry.expert}'{hint}", key=f"{key}.expert"
            )
        expert = entry.expert or name
        tasks.append(Task(name, data, names.index(expert) if expert in names else None))
    return tasks


def read_examples(path: Path, labels: bool, limit: int | None) -> list[dict[str, Any]]:
    """Examples of a .txt (one document a line) or JSONL ({"text", "label"}) file.

    ``labels``: every example needs an integer ``label``; errors name the file and line.
    """
    rows: list[dict[str, Any]] = []
    jsonl = path.suffix in (".jsonl", ".json")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvaluationError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise EvaluationError(
                        f"{path}:{number}: expected an object with a 'text' string"
                    )
            else:
                row = {"text": line.rstrip("\n")}
            if labels and (
                isinstance(row.get("label"), bool) or not isinstance(row.get("label"), int)
            ):
                raise EvaluationError(f"{path}:{number}: expected an integer 'label'")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise EvaluationError(f"{path}: no examples")
    return rows
