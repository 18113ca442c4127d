"""Training-run folders: ``checkpoint-<step>`` subfolders, matched across experts.

Matching ``step`` keeps the steps every run has. Matching ``fraction`` measures each run's
progress as step / its last step; the run with the fewest checkpoints (the first such) sets the
points, and every other run takes its checkpoint of nearest fraction (ties: the earlier one).
An expert that is a plain checkpoint, not a run, is the same at every point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import RecipeError, did_you_mean
from mergecli.recipe import Recipe

_STEP = re.compile(r"checkpoint-(\d+)")
MATCHES = ("step", "fraction")


@dataclass(frozen=True)
class Point:
    """One point of a sweep: each expert's checkpoint (None for an expert that is not a run)."""

    step: int | None
    """The common step (matching by step), else None."""
    fraction: float
    """Progress of the run: the step over the last (common) step."""
    steps: list[int | None]
    paths: list[Path]


def run_checkpoints(folder: Path) -> dict[int, Path]:
    """The ``checkpoint-<step>`` subfolders of a folder, by increasing step (empty if none)."""
    if not folder.is_dir():
        return {}
    found = [(m, p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name))]
    return dict(sorted((int(m.group(1)), p) for m, p in found))


def _nearest(run: dict[int, Path], fraction: float) -> int:
    last = max(run)
    return min(run, key=lambda s: (abs(s / last - fraction) if last else 0.0, s))


def sweep_points(recipe: Recipe, match: str) -> list[Point]:
    """The points of a checkpoint sweep over the recipe's experts (match: step or fraction)."""
    if match not in MATCHES:
        hint = did_you_mean(match, MATCHES)
        raise RecipeError(f"--match: '{match}' is not step or fraction{hint}", key="--match")
    paths = [recipe.resolve_path(m.model) for m in recipe.models]
    runs = [run_checkpoints(p) for p in paths]
    named = [(recipe.model_name(i), r) for i, r in enumerate(runs) if r]
    if not named:
        raise RecipeError(
            "--over-checkpoints: no expert names a training-run folder with checkpoint-<step> "
            "subfolders",
            key="--over-checkpoints",
        )
    if match == "step":
        common = sorted(set.intersection(*(set(r) for _, r in named)))
        if not common:
            spans = "; ".join(f"{n}: {min(r)}…{max(r)}" for n, r in named)
            raise RecipeError(
                f"--match step: no step is in every run ({spans}); try fraction", key="--match"
            )
        last = common[-1]
        return [
            Point(
                s,
                s / last if last else 1.0,
                [s if r else None for r in runs],
                [r[s] if r else p for r, p in zip(runs, paths, strict=True)],
            )
            for s in common
        ]
    reference = min((r for _, r in named), key=len)
    last = max(reference)
    points = []
    for step in reference:
        fraction = step / last if last else 1.0
        steps = [_nearest(r, fraction) if r else None for r in runs]
        chosen = [r[s] if s is not None else p for r, s, p in zip(runs, steps, paths, strict=True)]
        points.append(Point(None, fraction, steps, chosen))
    return points
