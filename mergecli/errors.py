"""Errors that reach the user as one clear line, typed so that callers and tests can tell them
apart by class and by field rather than by message text.

Every error is a ``MergeError``; the CLI prints ``str(error)`` on one line and exits 2. The
subclasses carry the thing they are about (a recipe key, a file, a tensor, a Hub id, an output
folder) as attributes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class MergeError(Exception):
    """A problem with the user's input or environment; printed as one line, no traceback."""


class RecipeError(MergeError):
    """A recipe value is missing, malformed or out of range; ``key`` is its dotted path
    (``parameters.density``, ``models[1].model``), or the command-line option that set it
    (``--size``, ``--grid``); None when the recipe as a whole is malformed."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class UnknownMethodError(RecipeError):
    """A method name (``merge_method``, ``parameters.base_method``, ``--methods``) names no
    registered method."""

    def __init__(self, message: str, method: str, key: str = "merge_method") -> None:
        super().__init__(message, key=key)
        self.method = method


class UnknownParameterError(RecipeError):
    """A parameter that the method does not take; ``key`` is where it was set
    (``parameters.x`` unless given, e.g. ``models[0].parameters.x`` or ``--grid``)."""

    def __init__(self, message: str, method: str, parameter: str, key: str | None = None) -> None:
        super().__init__(message, key=key or f"parameters.{parameter}")
        self.method = method
        self.parameter = parameter


class SourceError(MergeError):
    """An input (model folder, shard, adapter, artifact) is missing, unreadable or malformed;
    ``path`` is the file or folder."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class ShapeError(MergeError):
    """A tensor cannot be merged: missing from an input, of another shape or kind than the
    model needs, or the method failed on it; ``tensor`` is its name."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class NonFiniteError(MergeError):
    """A tensor holds NaN or Inf; ``source`` names the expert or file it came from, or
    ``merged`` when the method produced it."""

    def __init__(self, message: str, tensor: str, source: str) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.source = source


class HubError(SourceError):
    """A Hugging Face Hub id cannot be resolved (offline, missing, gated, revision)."""

    def __init__(self, message: str, repo_id: str, path: str | Path | None = None) -> None:
        super().__init__(message, path)
        self.repo_id = repo_id


class OutputError(MergeError):
    """The output cannot be written: it exists, is locked by another run, lacks space or
    permission; ``path`` is the folder or file."""

    def __init__(self, message: str, path: str | Path) -> None:
        super().__init__(message)
        self.path = Path(path)


class EvaluationError(MergeError):
    """An evaluator, its data or its command failed."""


class BatchError(MergeError):
    """Recipes of a batch failed (``failed``) or did not run because one they need failed
    (``blocked``); the others ran or were skipped."""

    def __init__(self, message: str, failed: list[str], blocked: list[str]) -> None:
        super().__init__(message)
        self.failed = failed
        self.blocked = blocked


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
