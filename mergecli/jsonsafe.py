"""Strict JSON: every report and ``--json`` print goes through ``strict_json``, which writes a
non-finite float (NaN, ±Inf; Python's json would write ``NaN``, invalid JSON) as ``null`` and
says where."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_only(data: Any, notes: list[str], where: str = "") -> Any:
    """``data`` with each non-finite float replaced by None, one note per replacement."""
    if isinstance(data, float) and not math.isfinite(data):
        notes.append(f"{where or 'value'}: {data} is not valid JSON; written as null")
        return None
    if isinstance(data, dict):
        return {
            k: finite_only(v, notes, f"{where}.{k}" if where else str(k)) for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return [finite_only(v, notes, f"{where}[{i}]") for i, v in enumerate(data)]
    return data


def strict_json(data: Any, indent: int | None = 2) -> tuple[str, list[str]]:
    """JSON text that any strict parser reads, and the notes on what was replaced."""
    notes: list[str] = []
    text = json.dumps(finite_only(data, notes), indent=indent, default=str, allow_nan=False)
    if len(notes) > 1:
        notes = [f"{len(notes)} non-finite numbers written as null in JSON (first {notes[0]})"]
    return text, notes
