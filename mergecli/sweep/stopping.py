"""Which checkpoint of a training run to take: T* and early stopping.

- **T\\*** (training-duration paper §3): the step of minimum loss on the run's held-out
  validation data, whatever metric scores the merges. It is read from the run's Hugging Face
  ``trainer_state.json`` (the ``eval_loss`` entries of ``log_history`` at the saved steps) when
  the last checkpoint has one covering every checkpoint, else computed with the built-in
  ``loss`` on the validation data of the run's tasks. Ties: the earlier step.
- **Early stopping with patience P** (undertraining paper §5.2; the plateau test of its
  Alg. 1, which decays the rate where §5.2 stops): the checkpoints are the validation
  evaluations, in order; training stops at the first evaluation that makes P in a row without
  a strict improvement of the best validation score, and the checkpoint taken is the best one
  seen until then (the global best when it never stops).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergecli.analyze.runs import run_checkpoints
from mergecli.errors import RecipeError, SourceError
from mergecli.evaluate import Scorer
from mergecli.recipe import Recipe


def _improves(value: float, best: float, higher_is_better: bool) -> bool:
    return value > best if higher_is_better else value < best


def global_best(scores: dict[int, float], higher_is_better: bool) -> int:
    """The step of the best score (the earlier of equals)."""
    steps = sorted(scores)
    best = steps[0]
    for step in steps[1:]:
        if _improves(scores[step], scores[best], higher_is_better):
            best = step
    return best


def early_stop(scores: dict[int, float], higher_is_better: bool, patience: int) -> int:
    """The checkpoint taken by early stopping with ``patience`` evaluations (see the module)."""
    if patience < 1:
        raise RecipeError("--stop-patience: expected a whole number ≥ 1", key="--stop-patience")
    steps = sorted(scores)
    best, waited = steps[0], 0
    for step in steps[1:]:
        if _improves(scores[step], scores[best], higher_is_better):
            best, waited = step, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best


def trainer_losses(run: dict[int, Path]) -> dict[int, float] | None:
    """``eval_loss`` at every saved step, from the last checkpoint's ``trainer_state.json``;
    None when it is absent or misses a step."""
    state = run[max(run)] / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        history = json.loads(state.read_text()).get("log_history", [])
    except json.JSONDecodeError as exc:
        raise SourceError(f"{state}: invalid JSON: {exc.msg}", path=state) from None
    logged = {
        int(e["step"]): float(e["eval_loss"])
        for e in history
        if isinstance(e, dict) and "eval_loss" in e and "step" in e
    }
    if not set(run) <= set(logged):
        return None
    return {step: logged[step] for step in run}


def loss_scorer(recipe: Recipe, scorer: Scorer) -> Scorer:
    """The recipe's scorer with the built-in ``loss`` on the same validation data."""
    section = recipe.evaluate
    assert section is not None
    if section.metric is None:
        raise RecipeError(
            "--by tstar: T* is the step of minimum validation loss; the runs have no "
            "trainer_state.json with eval_loss at every checkpoint and the recipe scores with "
            "a command (set evaluate.metric, or use --by step)",
            "evaluate.metric",
        )
    if section.metric == "loss":
        return scorer
    section = section.model_copy(update={"metric": "loss", "higher_is_better": None})
    return Scorer(recipe.model_copy(update={"evaluate": section}), scorer.device, scorer.bar)


def tstar_steps(recipe: Recipe, scorer: Scorer) -> dict[str, dict[str, Any]]:
    """Each run's validation loss per checkpoint, T* and where the losses came from."""
    out: dict[str, dict[str, Any]] = {}
    losses_by: Scorer | None = None
    for i, entry in enumerate(recipe.models):
        run = run_checkpoints(recipe.resolve_path(entry.model))
        if not run:
            continue
        name = recipe.model_name(i)
        losses = trainer_losses(run)
        source = "trainer_state.json"
        if losses is None:
            tasks = [t for t in scorer.tasks if t.expert == i]
            if not tasks:
                raise RecipeError(
                    f"--by tstar: no evaluate task has '{name}' as its expert, so its "
                    "validation loss is unknown (set evaluate.tasks.<task>.expert)",
                    "evaluate.tasks",
                )
            losses_by = losses_by or loss_scorer(recipe, scorer)
            losses = {step: losses_by.model(path, tasks).score for step, path in run.items()}
            source = "validation loss"
        out[name] = {"losses": losses, "tstar": global_best(losses, False), "source": source}
    if not out:
        raise RecipeError(
            "--over-checkpoints: no expert names a training-run folder with checkpoint-<step> "
            "subfolders",
            key="--over-checkpoints",
        )
    return out


def checkpoint_scores(recipe: Recipe, scorer: Scorer) -> dict[str, dict[int, float]]:
    """Each run's validation score (the recipe's metric, on its own tasks) per checkpoint."""
    out = {}
    for i, entry in enumerate(recipe.models):
        run = run_checkpoints(recipe.resolve_path(entry.model))
        tasks = [t for t in scorer.tasks if t.expert == i]
        if run and tasks:
            scores = scorer.each("model", [(path, tasks) for path in run.values()])
            out[recipe.model_name(i)] = {s: e.score for s, e in zip(run, scores, strict=True)}
    return out
