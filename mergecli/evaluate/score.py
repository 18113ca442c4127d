"""Scoring recipes and checkpoints with a recipe's evaluator.

A recipe is merged in memory when the evaluator can load tensors (the built-in metrics), else
into a temporary checkpoint folder that the command reads and that is removed afterwards. The
score of a model is the mean of its per-task scores.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecli.distributed.executor import LocalExecutor, RayExecutor, Resources
from mergecli.engine.merge import merge_state, run_merge
from mergecli.engine.plan import plan_merge, resolve_device
from mergecli.engine.scratch import scratch_folder
from mergecli.errors import MergeError, RecipeError, did_you_mean
from mergecli.evaluate.builtin import BuiltinEvaluator, MergedState
from mergecli.evaluate.command import CommandEvaluator
from mergecli.evaluate.predictions import Predictions
from mergecli.evaluate.tasks import Split, Task, has_test_data, resolve_tasks
from mergecli.progress import CountBar
from mergecli.recipe import Recipe

TIE = 1e-12
"""Scores closer than this (relative) are equal: means of equal per-task scores may differ
in the last bit."""


@dataclass
class Evaluation:
    """The scores of one model: per task and their mean; ``recipe`` is what was merged (a
    greedy soup's selected experts), ``details`` what a selection recorded."""

    tasks: dict[str, float]
    recipe: Recipe | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return math.fsum(self.tasks.values()) / len(self.tasks)


EvaluationCall = str | Callable[..., Evaluation]
"""What ``Scorer.each`` runs per call: the name of a Scorer method, or a function of the scorer
and the call's arguments (``mergecli.evaluate.score_recipe``)."""


class Scorer:
    """A recipe's ``evaluate:`` section, ready to score models and merges on a device."""

    def __init__(
        self,
        recipe: Recipe,
        device: str = "cpu",
        bar: CountBar | None = None,
        executor: LocalExecutor | RayExecutor | None = None,
        resources: Resources | None = None,
        *,
        split: Split = "validation",
    ) -> None:
        self.spec = recipe
        self.tasks = resolve_tasks(recipe, split)
        self.split = split
        """``validation`` (``evaluate.data``, what selection reads) or ``test``."""
        section = recipe.evaluate
        assert section is not None
        self.device = device
        source = (
            recipe.tokenizer_source if recipe.tokenizer_source not in ("base", "union") else None
        )
        tokenizer = source or recipe.base_model or recipe.models[0].model
        self.evaluator: BuiltinEvaluator | CommandEvaluator = (
            BuiltinEvaluator(
                section, resolve_device(device), recipe.seed, recipe.resolve_path(tokenizer)
            )
            if section.metric
            else CommandEvaluator(section)
        )
        self.metric = section.metric or "score"
        self.higher_is_better = self.evaluator.higher_is_better
        self.bar = bar or CountBar()
        self.expert_names = [recipe.model_name(i) for i in range(len(recipe.models))]
        self._models: dict[tuple[Path, tuple[str, ...]], dict[str, float]] = {}
        self.executor = executor
        self.resources = resources or Resources.for_device(device)
        self.placements: list[dict[str, Any]] = []
        """Where each evaluation that ran as a Ray task ran (host, pid, node id), in order."""

    def each(self, kind: EvaluationCall, calls: list[tuple[Any, ...]]) -> Iterator[Evaluation]:
        """``self.<kind>(*args)`` (kind names one: merge, model, artifact or folder) or
        ``kind(self, *args)`` (a function such as ``score_recipe``) for each args tuple, in
        order: here one after the other, or all at once as tasks of the Ray executor (each task
        scoring with a Scorer of its own; results and errors come back in order). A consumer
        that stops early cancels or skips the rest."""
        if self.executor is None or self.executor.kind == "local":
            for args in calls:
                yield _call(self, kind, *args)
            return
        for args in calls:
            self.executor.submit(
                _score_task,
                self.spec,
                self.device,
                self.split,
                kind,
                *args,
                resources=self.resources,
            )
        for done, args in zip(self.executor.results(), calls, strict=True):
            if done.error is not None:
                raise done.error
            name = kind if isinstance(kind, str) else kind.__name__
            self.placements.append({"call": name, **done.where})
            if kind == "model":
                tasks = self._pick(args[1] if len(args) > 1 else None)
                key = (Path(args[0]).resolve(), tuple(t.name for t in tasks))
                self._models[key] = dict(done.value.tasks)
            yield done.value

    def on_test(self) -> Scorer | None:
        """This scorer on the test data (``evaluate.test_data``), sharing its evaluator and bar;
        None when the recipe names no test data."""
        if not has_test_data(self.spec):
            return None
        other = copy.copy(self)
        other.tasks = resolve_tasks(self.spec, "test")
        other.split = "test"
        other._models = {}
        return other

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is better than ``b`` by more than rounding (1e-12 relative)."""
        margin = TIE * max(1.0, abs(b))
        return a > b + margin if self.higher_is_better else a < b - margin

    def best(self, scores: list[float]) -> int:
        """Index of the best score (the first of equals)."""
        best = 0
        for i, value in enumerate(scores):
            if self.better(value, scores[best]):
                best = i
        return best

    def _pick(self, tasks: list[Task] | None) -> list[Task]:
        return self.tasks if tasks is None else tasks

    def folder(self, folder: Path) -> Evaluation:
        """Scores of a checkpoint folder or of a task-conditional artifact folder."""
        return self.artifact(folder) if is_artifact(folder) else self.model(folder)

    def model(self, folder: Path, tasks: list[Task] | None = None) -> Evaluation:
        """Scores of a checkpoint folder (cached by path)."""
        tasks = self._pick(tasks)
        key = (folder.resolve(), tuple(t.name for t in tasks))
        if key not in self._models:
            self._models[key] = self.evaluator.score(folder, tasks, self.bar)
        return Evaluation(dict(self._models[key]))

    def merge(self, recipe: Recipe, tasks: list[Task] | None = None) -> Evaluation:
        """Scores of the model a recipe merges, without selection (the listed experts; a
        selecting method's are scored by ``mergecli.evaluate.score_recipe``)."""
        tasks = self._pick(tasks)
        plan = plan_merge(recipe, device=self.device, experts_selected=True)
        in_memory = plan.output.memory_error() is None and plan.vocabulary is None
        if (
            isinstance(self.evaluator, BuiltinEvaluator) and in_memory
        ):  # else: its folder's tokenizer
            state = merge_state(plan)
            return Evaluation(
                self.evaluator.score(MergedState(state, plan.reference.path), tasks, self.bar),
                recipe,
            )
        with scratch_folder("eval") as tmp:
            folder = run_merge(plan, tmp / "merged").output
            if is_artifact(folder):
                return Evaluation(self.artifact(folder, tasks).tasks, recipe)
            return Evaluation(self.evaluator.score(folder, tasks, self.bar), recipe)

    def merged(self, recipe: Recipe) -> MergedState:
        """The tensors a recipe merges, in memory (without selection), for ``predictions``."""
        plan = plan_merge(recipe, device=self.device, experts_selected=True)
        problem = plan.output.memory_error()
        if problem is not None:
            raise MergeError(f"per-example predictions merge in memory: {problem}")
        return MergedState(merge_state(plan), plan.reference.path)

    def predictions(self, source: Path | MergedState, task: Task) -> Predictions:
        """Per-example class probabilities and labels of a checkpoint folder or merged tensors
        on one task's data (built-in metrics on sequence classifiers only)."""
        if not isinstance(self.evaluator, BuiltinEvaluator):
            raise RecipeError(
                "evaluate.metric: per-example predictions need a built-in metric (accuracy or "
                "loss); an evaluation command returns one score per task",
                key="evaluate.metric",
            )
        return self.evaluator.predict(source, task)

    def artifact(self, folder: Path, tasks: list[Task] | None = None) -> Evaluation:
        """Scores of a task-conditional artifact (FlexMerge, EMR, TALL masks): each task on the
        artifact's model for that task (the task named like the task's expert, else like the
        task), rebuilt in memory, or exported to a temporary folder for a command."""
        from mergecli.artifacts import open_artifact, task_state_dict
        from mergecli.artifacts.export import export_task

        opened = open_artifact(folder)
        names = opened.task_names()
        scores: dict[str, float] = {}
        for task in self._pick(tasks):
            name = self.expert_names[task.expert] if task.expert is not None else task.name
            if name not in names:
                raise RecipeError(
                    f"evaluate.tasks.{task.name}: the artifact {folder} has no task '{name}'"
                    f"{did_you_mean(name, names)}; its tasks: {', '.join(names)}",
                    key=f"evaluate.tasks.{task.name}",
                )
            if isinstance(self.evaluator, BuiltinEvaluator):
                source = MergedState(task_state_dict(opened, name), opened.model_files())
                scores.update(self.evaluator.score(source, [task], self.bar))
                continue
            with scratch_folder("eval") as tmp:
                exported = export_task(opened, name, tmp / name)
                scores.update(self.evaluator.score(exported, [task], self.bar))
        return Evaluation(scores)

    def placement_summary(self) -> dict[str, Any] | None:
        """Which node did what, for a table's ``executor`` entry (None when all ran here)."""
        if not self.placements:
            return None
        return {"kind": "ray", "tasks": self.placements}

    def record_placements(self, table: dict[str, Any]) -> dict[str, Any]:
        """``table`` with an ``executor`` entry saying which node did what, where Ray ran any
        evaluation (the rest of the table is the same whichever executor ran it)."""
        summary = self.placement_summary()
        if summary is not None:
            table["executor"] = summary
        return table

    def moe(self, recipe: Recipe, tasks: list[Task] | None = None) -> Evaluation:
        """Scores of the mixture of experts a ``moe:`` recipe builds (in a temporary folder)."""
        from mergecli.moe import plan_moe, run_moe

        plan = plan_moe(recipe, device=self.device)
        with scratch_folder("eval") as tmp:
            folder = run_moe(plan, tmp / "moe").folder
            return Evaluation(self.evaluator.score(folder, self._pick(tasks), self.bar), recipe)

    def expert_scores(self, recipe: Recipe) -> dict[str, float]:
        """Each task's score of the expert trained for it (tasks without an expert are left out)."""
        mine = [task for task in self.tasks if task.expert is not None]
        calls = [(recipe.resolve_path(recipe.models[t.expert].model), [t]) for t in mine]  # type: ignore[index]
        return {
            t.name: e.tasks[t.name] for t, e in zip(mine, self.each("model", calls), strict=True)
        }


def _call(scorer: Scorer, kind: EvaluationCall, *args: Any) -> Evaluation:
    """One evaluation of ``Scorer.each``: the Scorer method ``kind`` names, or ``kind`` itself
    called with the scorer."""
    if not isinstance(kind, str):
        return kind(scorer, *args)
    result: Evaluation = getattr(scorer, kind)(*args)
    return result


def _score_task(
    spec: Recipe, device: str, split: Split, kind: EvaluationCall, *args: Any
) -> Evaluation:
    """One evaluation on a Ray worker, with a Scorer built there from the same recipe and
    split."""
    return _call(Scorer(spec, device, split=split), kind, *args)


def is_artifact(folder: Path) -> bool:
    """Whether a folder is a task-conditional artifact (else a checkpoint)."""
    from mergecli.artifacts import open_artifact

    try:
        open_artifact(folder)
    except MergeError:
        return False
    return True
