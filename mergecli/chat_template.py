"""The output's chat template (mergekit's ``chat_template`` key): a Jinja text or ``auto``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from mergecli.errors import RecipeError

CONFIG = "tokenizer_config.json"


def check_chat_template(value: str | None, source: str) -> None:
    """``auto`` or a Jinja template (at least 20 characters with a ``{``), as mergekit accepts;
    mergekit's named templates are not bundled."""
    if value is None or value == "auto" or (len(value) >= 20 and "{" in value):
        return
    raise RecipeError(
        f"{source}: chat_template: '{value}' is neither auto nor a Jinja template (mergekit's "
        "named templates such as chatml are not bundled: paste the template's text)",
        key="chat_template",
    )


def model_template(folder: Path) -> str | None:
    """The chat template in a model folder's tokenizer_config.json, if any."""
    file = folder / CONFIG
    if not file.is_file():
        return None
    template = json.loads(file.read_text()).get("chat_template")
    if isinstance(template, dict):  # several named templates: mergekit takes "default"
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str | None, inputs: Iterable[Path]) -> str | None:
    """The template to write: the recipe's text, or for ``auto`` the one most inputs have."""
    if value != "auto":
        return value
    found = [t for t in map(model_template, inputs) if t is not None]
    return Counter(found).most_common(1)[0][0] if found else None


def write_chat_template(folder: Path, template: str) -> None:
    """Set ``chat_template`` in the output's tokenizer_config.json (created if absent)."""
    file = folder / CONFIG
    config = json.loads(file.read_text()) if file.is_file() else {}
    config["chat_template"] = template
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
