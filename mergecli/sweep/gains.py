"""What merging gains, against the effective noise scale of the experts' training
(optimiser-bias paper). Each recipe is one training setting; for each:

- **merge gain** (§3.1): g = f(θmerge) − (1/n) Σ_e f(θe), f the mean score over the recipe's
  tasks, θmerge the recipe's merge, θe its n experts (a training run: its last checkpoint);
- **normalised accuracy** (App. A.3): (1/T) Σ_t f_t(θmerge) / f_t(θt), over the T tasks that
  have an expert θt (meant for accuracy, a higher-is-better score);
- **SWA gain** (App. G, with ``swa`` = k): each run's stochastic weight average
  θe^swa = (1/k) Σ of its last k checkpoints, merged as the paper does by the uniform average
  θm^swa = (1/n) Σ_e θe^swa; gain_swa = f(θm^swa) − (1/n) Σ_e f(θe^swa);
- **S̃** = η / (B(1 − μ)) of each expert (``mergecli.sweep.noise``); the setting's S̃ is their
  mean, with a warning when the experts were trained with different ones.

For a loss (lower is better) the gains keep the paper's sign: negative is an improvement.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mergecli.analyze.runs import run_checkpoints
from mergecli.errors import RecipeError
from mergecli.evaluate import Scorer, score_recipe
from mergecli.recipe import ModelEntry, Recipe
from mergecli.sweep.noise import training_hyperparameters

SPREAD = 1e-9
"""Relative difference of S̃ between a setting's experts that is reported as a warning."""


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _endpoint(path: Path) -> Path:
    """A training run's last checkpoint; any other folder as it is."""
    run = run_checkpoints(path)
    return run[max(run)] if run else path


def average_recipe(recipe: Recipe, folders: list[Path]) -> Recipe:
    """The uniform average of ``folders`` as a linear merge (no base)."""
    weight = 1.0 / len(folders)
    models = [ModelEntry(model=str(f), parameters={"weight": weight}) for f in folders]
    return recipe.model_copy(
        update={
            "merge_method": "linear",
            "base_model": None,
            "models": models,
            "parameters": {"normalize": False},
            "moe": None,
        }
    )


def swa_checkpoints(name: str, path: Path, k: int) -> list[Path]:
    """The last ``k`` checkpoints of the run ``name``."""
    run = run_checkpoints(path)
    if not run:
        raise RecipeError(
            f"--swa: {name} ({path}) is not a training run with checkpoint-<step> folders",
            key="--swa",
        )
    if len(run) < k:
        raise RecipeError(f"--swa {k}: the run {name} has {len(run)} checkpoints", key="--swa")
    return [run[s] for s in sorted(run)[-k:]]


def setting_gains(
    recipe: Recipe,
    scorer: Scorer,
    swa: int | None = None,
    given: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Merge gain, normalised accuracy, S̃ and (with ``swa``) the SWA gain of one recipe."""
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    paths = [recipe.resolve_path(m.model) for m in recipe.models]
    training = {n: training_hyperparameters(n, p, given) for n, p in zip(names, paths, strict=True)}
    ends = [_endpoint(p) for p in paths]
    at = recipe.model_copy(
        update={
            "models": [
                m.model_copy(update={"model": str(e), "name": n})
                for m, e, n in zip(recipe.models, ends, names, strict=True)
            ]
        }
    )
    experts = dict(zip(names, scorer.each("model", [(e,) for e in ends]), strict=True))
    merged = score_recipe(scorer, at)
    own = scorer.expert_scores(at)
    for task, value in own.items():
        if value == 0:
            raise RecipeError(
                f"evaluate.tasks.{task}: its expert scores 0, so normalised accuracy "
                "(merged / expert) is undefined",
                key=f"evaluate.tasks.{task}",
            )
    scales = [t["noise_scale"] for t in training.values()]
    warnings = []
    if max(scales) - min(scales) > SPREAD * max(scales):
        warnings.append(
            "the experts were trained with different S̃ ("
            + ", ".join(f"{n} {t['noise_scale']:.4g}" for n, t in training.items())
            + "); the setting's S̃ is their mean"
        )
    expert_mean = _mean([e.score for e in experts.values()])
    row: dict[str, Any] = {
        "experts": {n: {"tasks": e.tasks, "score": e.score} for n, e in experts.items()},
        "checkpoints": [str(e) for e in ends],
        "training": training,
        "noise_scale": _mean(scales),
        "merged": {"tasks": merged.tasks, "score": merged.score},
        "expert_score": expert_mean,
        "merge_gain": merged.score - expert_mean,
        "own_task": own,
        "normalized": _mean([merged.tasks[t] / v for t, v in own.items()]) if own else None,
        "warnings": warnings,
    }
    if swa is not None:
        if swa < 1:
            raise RecipeError("--swa: expected a whole number ≥ 1 of checkpoints", key="--swa")
        runs = [swa_checkpoints(n, p, swa) for n, p in zip(names, paths, strict=True)]
        averages = [average_recipe(recipe, r) for r in runs]
        swa_experts = list(scorer.each("merge", [(a,) for a in averages]))
        swa_merged = scorer.merge(average_recipe(recipe, [c for r in runs for c in r]))
        swa_mean = _mean([e.score for e in swa_experts])
        row["swa"] = {
            "k": swa,
            "checkpoints": {n: [str(c) for c in r] for n, r in zip(names, runs, strict=True)},
            "experts": {n: e.score for n, e in zip(names, swa_experts, strict=True)},
            "expert_score": swa_mean,
            "merged": swa_merged.score,
            "gain": swa_merged.score - swa_mean,
        }
    return row


def gains(
    recipes: list[tuple[str, Recipe]],
    scorers: list[Scorer],
    swa: int | None = None,
    given: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """``setting_gains`` of each (label, recipe), scored by its scorer, sorted by S̃."""
    metrics = {s.metric for s in scorers}
    if len(metrics) > 1:
        raise RecipeError(
            "evaluate.metric: the recipes score with different metrics "
            f"({', '.join(sorted(metrics))})",
            key="evaluate.metric",
        )
    rows = []
    for (label, recipe), scorer in zip(recipes, scorers, strict=True):
        rows.append({"setting": label, **setting_gains(recipe, scorer, swa, given)})
        scorer.record_placements(rows[-1])
    rows.sort(key=lambda r: r["noise_scale"])
    return {
        "metric": scorers[0].metric,
        "higher_is_better": scorers[0].higher_is_better,
        "formula": "S̃ = η / (B(1 − μ))",
        "settings": rows,
    }
