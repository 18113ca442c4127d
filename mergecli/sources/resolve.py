"""Open a recipe's models, whatever they are: checkpoint folders, PEFT adapters or Hub ids."""

from __future__ import annotations

from pathlib import Path

import torch

from mergecli.errors import RecipeError, SourceError
from mergecli.recipe import Recipe
from mergecli.sources.adapter import ADAPTER_CONFIG, Adapter, read_peft_config
from mergecli.sources.checkpoint import Checkpoint
from mergecli.sources.hub import hub_snapshot, open_checkpoint, parse_hub_id
from mergecli.sources.stacked import Stacked

Source = Checkpoint | Adapter | Stacked
"""Anything that answers "which tensors" and "give me tensor X" (weights or task vectors)."""


def locate(recipe: Recipe, value: str, label: str, revision: str | None = None) -> Path:
    """The local folder of a model: a path (relative to the recipe), else a Hub snapshot."""
    path = recipe.resolve_path(value)
    if path.exists():
        return path
    hub = parse_hub_id(value, revision)
    if hub is None:
        raise SourceError(
            f"{label}: '{value}' does not exist (looked in {recipe.folder})",
            path=recipe.folder / value,
        )
    return hub_snapshot(*hub, label)


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def adapters_base(recipe: Recipe, folders: list[Path]) -> tuple[str, str | None, str] | None:
    """(base, revision, label) that the recipe's adapters name, when the recipe names no base;
    adapters made for different bases are an error."""
    found: tuple[str, str | None, str] | None = None
    for i, folder in enumerate(folders):
        if not is_adapter(folder):
            continue
        label = f"models[{i}].model"
        config = read_peft_config(folder, label)
        base = config.base_model_name_or_path
        if not base:
            raise SourceError(
                f"{label}: {folder / ADAPTER_CONFIG} names no base_model_name_or_path; "
                "set base_model in the recipe",
                path=folder / ADAPTER_CONFIG,
            )
        if found and base != found[0]:
            raise SourceError(
                f"{label}: adapter made for base '{base}', but {found[2]} was made for "
                f"'{found[0]}'; adapters of one merge must share their base",
                path=folder / ADAPTER_CONFIG,
            )
        found = found or (base, getattr(config, "revision", None), label)
    return found


def open_models(recipe: Recipe) -> tuple[Checkpoint | None, list[Source]]:
    """The recipe's base (its own, else the one its adapters name) and its experts."""
    folders = [
        locate(recipe, m.model, f"models[{i}].model", m.revision)
        for i, m in enumerate(recipe.models)
    ]
    base = None
    if recipe.base_model:
        base = open_base(recipe, recipe.base_model, "base_model")
    elif named := adapters_base(recipe, folders):
        value, revision, label = named
        base = open_base(recipe, value, f"base_model (from {label}'s adapter_config)", revision)
    dtype = torch.float64 if recipe.dtype == "float64" else torch.float32
    experts = [
        open_source(recipe, folder, f"models[{i}].model", base, dtype)
        for i, folder in enumerate(folders)
    ]
    return base, experts


def open_base(recipe: Recipe, value: str, label: str, revision: str | None = None) -> Checkpoint:
    """The base checkpoint; ``origin`` keeps the Hub id, else the resolved path."""
    folder = locate(recipe, value, label, revision)
    base = open_checkpoint(folder, label, allow_bin=recipe.allow_bin)
    local = recipe.resolve_path(value)
    base.origin = str(local) if local.exists() else value.partition("@")[0]
    return base


def open_source(
    recipe: Recipe,
    folder: Path,
    label: str,
    base: Checkpoint | None,
    dtype: torch.dtype = torch.float32,
) -> Source:
    """A located model folder as a source: an adapter over ``base``, or a checkpoint."""
    if not is_adapter(folder):
        return open_checkpoint(folder, label, allow_bin=recipe.allow_bin)
    if base is None:
        raise RecipeError(
            f"{label}: '{folder}' is an adapter; it needs a base model", key="base_model"
        )
    return Adapter(folder, label, base, dtype)
