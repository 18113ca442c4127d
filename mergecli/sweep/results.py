"""Writing an evaluation-driven run's result: its JSON and its figure, in a new folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergecli.engine.output import atomic_folder
from mergecli.jsonsafe import strict_json


def write_results(
    result: dict[str, Any],
    target: Path,
    force: bool,
    stem: str,
    figure: Callable[[dict[str, Any], Path], Path],
) -> None:
    """``stem.json`` and ``stem.png`` written into a new folder ``target`` (atomically); their
    paths are added to ``result["files"]``."""
    with atomic_folder(target, force) as folder:
        figure(result, folder / f"{stem}.png")
        (folder / f"{stem}.json").write_text(strict_json(result)[0] + "\n")
    result["files"] = [str(target / f"{stem}.json"), str(target / f"{stem}.png")]
