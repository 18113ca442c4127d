"""Scoring candidate models: evaluators (built-in metrics or a command), tasks, greedy soup."""

from mergecli.evaluate.builtin import BuiltinEvaluator, MergedState
from mergecli.evaluate.command import CommandEvaluator
from mergecli.evaluate.greedy import greedy_soup
from mergecli.evaluate.score import Evaluation, Scorer
from mergecli.evaluate.selection import plan_with_selection, score_recipe
from mergecli.evaluate.tasks import Task, resolve_tasks

__all__ = [
    "BuiltinEvaluator",
    "CommandEvaluator",
    "Evaluation",
    "MergedState",
    "Scorer",
    "Task",
    "greedy_soup",
    "plan_with_selection",
    "resolve_tasks",
    "score_recipe",
]
