"""Errors that reach the user as one clear line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeError(Exception):
    """A problem with the user's input or environment; printed as one line, no traceback."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
