"""Temporal merging evaluated over time (TIME §2.2 step 5 "Eval", §3, App. C).

For each (init, deploy) pair, the recipe's experts arrive in order through a state folder of
their own; before step t the expert is trained from the pair's init model (``temporal.train``,
else the recipe's expert, which is trained from θ0 and so only fits ``init: base``), and after
step t the deploy model is scored on every task of the ``evaluate:`` section. The metrics (§3,
"Evaluation and Metrics"):

- A_KA (knowledge accumulation): the mean score over the adaptation tasks, i.e. every task
  whose expert is in the sequence, seen yet or not;
- A_ZS (zero-shot retention): the mean score over the held-out tasks, the evaluate tasks with
  no expert in the sequence (the paper's separate evaluation datasets);
- √(A_KA·A_ZS), their geometric mean (App. C, third panel);
- also ``known`` and ``unseen``: the mean over the adaptation tasks whose expert arrived at
  steps ≤ t, and over those still to come (None when there are none).

The eight pairs of §3.2 are the 3 × 3 strategies less (init base, deploy latest).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergecli.errors import OutputError, RecipeError
from mergecli.evaluate.score import Evaluation, Scorer
from mergecli.jsonsafe import strict_json
from mergecli.recipe import Recipe
from mergecli.temporal.fold import NewProgress, expert_fingerprint, fold, init_state
from mergecli.temporal.manifest import read_manifest
from mergecli.temporal.state import locked
from mergecli.temporal.train import Trainer, TrainRequest, command_trainer

INITS = ("base", "latest", "ema")
DEPLOYS = ("latest", "ema", "all")
PAIRS = tuple((i, d) for i in INITS for d in DEPLOYS if (i, d) != ("base", "latest"))
"""The eight valid (init, deploy) pairs of TIME §3.2, init strategy slowest."""
RESULT = "temporal_eval.json"
FIGURE = "temporal_eval.png"

Pair = tuple[str, str]


def parse_pairs(text: str) -> list[Pair]:
    """``all`` (the eight pairs) or a comma list of ``init/deploy`` (``ema/ema,base/all``)."""
    if text.strip() == "all":
        return list(PAIRS)
    pairs = []
    for item in text.split(","):
        init, sep, deploy = item.strip().partition("/")
        if not sep or init not in INITS or deploy not in DEPLOYS:
            raise RecipeError(
                f"--pairs '{item.strip()}': expected INIT/DEPLOY with INIT in "
                f"{', '.join(INITS)} and DEPLOY in {', '.join(DEPLOYS)}, or 'all'",
                key="--pairs",
            )
        pairs.append((init, deploy))
    return list(dict.fromkeys(pairs))


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def time_metrics(scores: dict[str, float], arrival: dict[str, int], step: int) -> dict[str, Any]:
    """A_KA, A_ZS, their geometric mean, known and unseen after ``step`` from per-task scores;
    ``arrival`` maps each adaptation task to the step its expert arrives at (held-out tasks are
    the others)."""
    adaptation = [scores[t] for t in arrival]
    held_out = [v for t, v in scores.items() if t not in arrival]
    ka, zs = _mean(adaptation), _mean(held_out)
    geo = math.sqrt(ka * zs) if ka is not None and zs is not None and ka * zs >= 0 else None
    return {
        "ka": ka,
        "zs": zs,
        "geo": geo,
        "known": _mean([scores[t] for t, s in arrival.items() if s <= step]),
        "unseen": _mean([scores[t] for t, s in arrival.items() if s > step]),
    }


def _settings(recipe: Recipe, init: str, deploy: str) -> dict[str, Any]:
    settings = recipe.model_dump(mode="json", exclude={"models", "output", "folder", "evaluate"})
    settings["temporal"] = {**settings["temporal"], "init": init, "deploy": deploy}
    settings["temporal"]["keep_steps"] = False
    return settings


def _prepare(output: Path, force: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not force:
            raise OutputError(
                f"output '{output}' is not empty; use --force to start the study over",
                path=output,
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def evaluate_over_time(
    recipe: Recipe,
    output: str | Path,
    pairs: list[Pair] | None = None,
    device: str = "cpu",
    trainer: Trainer | None = None,
    force: bool = False,
    new_progress: NewProgress | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    source: str = "recipe",
) -> dict[str, Any]:
    """Replay the recipe's experts for each (init, deploy) pair and score every step's deploy
    model; writes ``temporal_eval.json`` and the trajectory plot ``temporal_eval.png`` into
    ``output`` and returns the JSON's content.

    ``trainer`` (default: ``temporal.train`` as a command) trains step t's expert from the init
    model; pairs sharing an init strategy share their experts. Scores are on ``test_data`` when
    the ``evaluate:`` section names it, else on ``data``. ``pairs`` default to the eight valid
    ones with a trainer, else to those with init base (the recipe's experts come from θ0).
    """
    from mergecli.temporal.plot import trajectory_figure

    if recipe.temporal is None:
        raise RecipeError(f"{source}: no temporal section", key="temporal")
    for i, entry in enumerate(recipe.models):
        if entry.parameters:
            raise RecipeError(
                f"{source}: models[{i}].parameters: a temporal recipe sets parameters for every "
                "step under parameters",
                key=f"models[{i}].parameters",
            )
    if trainer is None and recipe.temporal.train:
        trainer = command_trainer(recipe.temporal.train)
    if pairs is None:
        pairs = [p for p in PAIRS if trainer or p[0] == "base"]
    if trainer is None and any(init != "base" for init, _ in pairs):
        raise RecipeError(
            f"{source}: temporal.train: init latest or ema trains each expert from a merged or "
            "earlier model, so a train command is needed (the recipe's experts were trained "
            "from θ0); without one, evaluate the pairs with init base",
            key="temporal.train",
        )
    scorer = Scorer(recipe, device)
    scorer = scorer.on_test() or scorer
    arrival = {t.name: t.expert + 1 for t in scorer.tasks if t.expert is not None}
    if not arrival:
        raise RecipeError(
            f"{source}: evaluate: no task has an expert in the sequence, so A_KA is undefined",
            key="evaluate.tasks",
        )
    target = Path(output).resolve()
    _prepare(target, force)
    base = recipe.resolve_path(str(recipe.base_model)).resolve()

    def row(pair: Pair, step: int, name: str | None, result: Evaluation) -> dict[str, Any]:
        entry = {
            "init": pair[0],
            "deploy": pair[1],
            "step": step,
            "expert": name,
            "tasks": result.tasks,
            **time_metrics(result.tasks, arrival, step),
        }
        if on_row:
            on_row(entry)
        return entry

    base_row = row(("base", "base"), 0, None, scorer.model(base))
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for init in dict.fromkeys(i for i, _ in pairs):
        group = [p for p in pairs if p[0] == init]
        states = {}
        for pair in group:
            states[pair] = target / "states" / f"{pair[0]}-{pair[1]}"
            _, notes = init_state(states[pair], _settings(recipe, *pair), folder=recipe.folder)
            warnings += [n for n in notes if n not in warnings]
        start = base
        for index, entry in enumerate(recipe.models):
            step, name = index + 1, recipe.model_name(index)
            model = recipe.resolve_path(entry.model).resolve()
            expert = model
            if trainer is not None:
                out = target / "experts" / init / f"{step:02d}-{name}"
                expert = trainer(TrainRequest(step, name, start, out, model))
            fingerprint = expert_fingerprint(expert, f"step {step} expert", recipe.allow_bin)
            for pair in group:
                with locked(states[pair]):
                    manifest = read_manifest(states[pair])
                    done = fold(
                        states[pair],
                        manifest,
                        expert,
                        name,
                        fingerprint,
                        device,
                        "5GB",
                        new_progress,
                    )
                warnings += [w for w in done.warnings if w not in warnings]
                rows.append(row(pair, step, name, scorer.model(done.deploy_model)))
            start = done.init_model
    temporal = recipe.temporal
    result: dict[str, Any] = {
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "reported_on": scorer.split,
        "method": recipe.merge_method,
        "parameters": recipe.model_dump(mode="json")["parameters"],
        "ema_weight": temporal.ema_weight,
        "recency": temporal.recency,
        "recency_reversed": temporal.recency_reversed,
        "task_vectors": temporal.task_vectors,
        "trained": trainer is not None,
        "adaptation_tasks": arrival,
        "held_out_tasks": [t.name for t in scorer.tasks if t.name not in arrival],
        "pairs": [f"{i}/{d}" for i, d in pairs],
        "base": base_row,
        "rows": rows,
        "warnings": warnings,
    }
    (target / RESULT).write_text(strict_json(result)[0] + "\n")
    trajectory_figure(result, target / FIGURE)
    return result
