"""Replay a recipe's ordered experts through a temporal state (``mergecli temporal RECIPE``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import OutputError, RecipeError
from mergecli.recipe import Recipe
from mergecli.temporal.fold import (
    NewProgress,
    StepResult,
    check_settings,
    expert_fingerprint,
    fold,
)
from mergecli.temporal.manifest import MANIFEST, Manifest, read_manifest
from mergecli.temporal.state import create_state, locked, settle


@dataclass
class ReplayResult:
    """The state folder, how many steps it already held, and the steps this replay folded."""

    state: Path
    resumed_at: int
    steps: list[StepResult]
    warnings: list[str]


def resume_point(target: Path, fresh: Manifest, experts: list[tuple[Path, str, str]]) -> int:
    """Steps already committed in ``target`` by an earlier run of the same recipe."""
    current = read_manifest(target)
    if current.settings != fresh.settings or current.base_fingerprint != fresh.base_fingerprint:
        keys = sorted(
            k
            for k in {*current.settings, *fresh.settings}
            if current.settings.get(k) != fresh.settings.get(k)
        ) or ["the base's fingerprint"]
        raise OutputError(
            f"output '{target}' holds a temporal state with other settings "
            f"({', '.join(keys)}); use --force to start over",
            path=target,
        )
    for i, step in enumerate(current.steps):
        if i >= len(experts) or (step.expert, step.fingerprint) != (
            str(experts[i][0]),
            experts[i][2],
        ):
            raise OutputError(
                f"output '{target}': its step {i + 1} ({step.name}, {step.expert}) is not "
                f"models[{i}] of the recipe; use --force to start over",
                path=target,
            )
    return len(current.steps)


def replay(
    recipe: Recipe,
    output: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    new_progress: NewProgress | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    source: str = "recipe",
) -> ReplayResult:
    """Fold ``recipe.models`` in order into the state folder ``output`` (or ``recipe.output``).

    A state left by an interrupted run of the same recipe is resumed where it stopped; with
    ``force`` the state starts over. With ``temporal.keep_steps`` every step's deploy model is
    kept and listed by ``status``.
    """
    if recipe.temporal is None:
        raise RecipeError(
            f"{source}: no temporal section (a plain merge runs with 'mergecli merge')",
            key="temporal",
        )
    for i, entry in enumerate(recipe.models):
        if entry.parameters:
            raise RecipeError(
                f"{source}: models[{i}].parameters: a temporal recipe sets parameters for every "
                "step under parameters",
                key=f"models[{i}].parameters",
            )
    if output is None and recipe.output is None:
        raise RecipeError(
            f"{source}: no state folder: set 'output' in the recipe or --output", key="output"
        )
    target = (Path(output) if output else recipe.resolve_path(str(recipe.output))).resolve()
    settings = recipe.model_dump(mode="json", exclude={"models", "output", "folder"})
    fresh, warnings = check_settings(settings, recipe.folder, source)
    experts = []
    for i, entry in enumerate(recipe.models):
        path = recipe.resolve_path(entry.model).resolve()
        label = f"{source}: models[{i}].model"
        experts.append(
            (path, recipe.model_name(i), expert_fingerprint(path, label, recipe.allow_bin))
        )
    if force or not (target / MANIFEST).is_file():
        create_state(target, fresh, force)
        done = 0
    else:
        done = resume_point(target, fresh, experts)
    results = []
    for path, name, fingerprint in experts[done:]:
        with locked(target):
            manifest = read_manifest(target)
            result = fold(
                target, manifest, path, name, fingerprint, device, shard_size, new_progress
            )
        results.append(result)
        if on_step:
            on_step(result)
    if not results:
        with locked(target):
            settle(target, read_manifest(target))
    return ReplayResult(target, done, results, warnings)
