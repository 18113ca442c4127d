"""Validation for selection, test for reporting (undertraining §3 and App. B; training-duration
§3).

Sweeps, greedy soup and duration sweeps select on the ``evaluate:`` section's ``data`` (the
validation data); when ``test_data`` is given, the merge they select is scored on it and that
score is the one reported. Their results say which data did what (``protocol``).
"""

from __future__ import annotations

from typing import Any

from mergecli.evaluate.score import Scorer
from mergecli.recipe import Recipe


def protocol(test: Scorer | None) -> dict[str, str]:
    """Which data selected and which reported."""
    return {"selected_on": "validation", "reported_on": "test" if test else "validation"}


def describe(protocol: dict[str, str]) -> str:
    """One line for tables and plots."""
    if protocol["reported_on"] == "test":
        return "chosen on validation data, reported on test data"
    return "chosen and reported on validation data (no evaluate.test_data)"


def report(test: Scorer | None, recipe: Recipe | None) -> dict[str, Any] | None:
    """The test scores ``{tasks, score}`` of a selected merge; None without test data."""
    if test is None or recipe is None:
        return None
    result = test.merge(recipe)
    return {"tasks": result.tasks, "score": result.score}
