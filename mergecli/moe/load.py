"""Load an MoE output folder: the Arrow peft model over a base, or the sparse MoE model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergecli.errors import SourceError

MANIFEST = "moe.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's ``moe.json``; SourceError when it is not an MoE output."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SourceError(f"'{folder}' is not a mergecli MoE output (no {MANIFEST})", folder)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}", path) from None
    if manifest.get("format") != "mergecli-moe" or manifest.get("kind") not in ("arrow", "sparse"):
        raise SourceError(f"{path} is not a mergecli MoE manifest", path)
    return manifest


def model_class(folder: Path) -> Any:
    """The transformers class a local model folder's config names (AutoModelForCausalLM for a
    Hub id or a class transformers lacks)."""
    import transformers

    config = folder / "config.json"
    if config.is_file():
        names = json.loads(config.read_text()).get("architectures") or []
        if names and hasattr(transformers, names[0]):
            return getattr(transformers, names[0])
    return transformers.AutoModelForCausalLM


def load(folder: str | Path, base: Any = None, **kwargs: Any) -> Any:
    """The model an MoE output folder holds.

    Arrow: ``peft.create_arrow_model`` over ``base`` (a transformers model, or a folder or Hub
    id loaded with the class its config names; default: the manifest's base) with the folder's
    task adapters, general adapters and ArrowConfig. Sparse: the folder itself with
    ``AutoModelForCausalLM``. ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["kind"] == "sparse":
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    from peft import ArrowConfig, create_arrow_model

    if base is None or isinstance(base, str | Path):
        base = model_class(Path(base or manifest["base_model"])).from_pretrained(
            str(base or manifest["base_model"]), **kwargs
        )
    general = [str(folder / g) for g in manifest["general"]]
    return create_arrow_model(
        base,
        task_specific_adapter_paths=[str(folder / e) for e in manifest["experts"]],
        arrow_config=ArrowConfig(**manifest["arrow_config"]),
        general_adapter_paths=general or None,
    )
