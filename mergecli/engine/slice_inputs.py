"""The inputs of a slices merge: each slice's sources opened and checked, and what each
stacked input reads under each output name (``engine/slices.py`` plans the merge)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.conventions import parameter_position, same_model
from mergecli.engine.plan import model_counts
from mergecli.errors import RecipeError, ShapeError
from mergecli.layers import count_layers, is_before_layers, layer_index, layer_prefix
from mergecli.methods import MethodSpec
from mergecli.recipe import OutputSlice, Recipe
from mergecli.sources import Checkpoint, TensorInfo

Names = dict[str, tuple[Checkpoint, str]]
"""Output tensor name → (checkpoint, stored name): what one stacked input reads."""


@dataclass
class Input:
    """One input of a slice: a source (or its base), its first layer and its index in the
    slice's ``sources``."""

    checkpoint: Checkpoint
    start: int
    source: int
    name: str
    parameters: dict[str, Any]


@dataclass
class Slice:
    """One output slice: its inputs (its base first when the method uses one)."""

    index: int
    definition: OutputSlice
    inputs: list[Input]
    has_base: bool
    length: int

    @property
    def experts(self) -> list[Input]:
        return self.inputs[1:] if self.has_base else self.inputs


Opener = Callable[[str, str], Checkpoint]


def open_slice(
    recipe: Recipe, method: MethodSpec, index: int, part: OutputSlice, checkpoint: Opener
) -> Slice:
    """One slice's sources, checked: layer ranges inside their models and of one length; its
    base (when the method uses one) first among its inputs."""
    at = f"slices[{index}]"
    inputs = []
    length = None
    for j, source in enumerate(part.sources):
        key = f"{at}.sources[{j}]"
        model = checkpoint(source.model, f"{key}.model")
        start, stop = source.layer_range
        total = count_layers(model.tensor_names())
        if not 0 <= start < stop <= total:
            raise RecipeError(
                f"{key}.layer_range: [{start}, {stop}] is not a range of the {total} layers "
                f"of '{source.model}' (0 ≤ start < end ≤ {total})",
                key=f"{key}.layer_range",
            )
        if length is not None and stop - start != length:
            raise RecipeError(
                f"{key}.layer_range: [{start}, {stop}] covers {stop - start} layers, "
                f"sources[0] {length}: the sources of a slice cover as many layers",
                key=f"{key}.layer_range",
            )
        length = stop - start
        inputs.append(
            Input(model, start, j, Path(source.model.rstrip("/")).name, source.parameters)
        )
    assert length is not None
    base = part.base_model or recipe.base_model
    at_base = next(
        (j for j, s in enumerate(part.sources) if base and same_model(recipe, s.model, base)),
        None,
    )
    if method.base == "unused" or at_base is None:
        if method.base == "required":
            key = f"{at}.base_model" if part.base_model else "base_model"
            raise RecipeError(
                f"{key}: '{method.name}' needs a base model among the sources of {at}",
                key=key,
            )
        return Slice(index, part, inputs, False, length)
    experts = [s for s in inputs if s.source != at_base or recipe.conventions != "mergekit"]
    return Slice(index, part, [inputs[at_base], *experts], True, length)


def check_counts(recipe: Recipe, method: MethodSpec, slices: list[Slice], notes: list[str]) -> None:
    """Every slice has as many experts as the method takes, the same number, and a base in
    all of them or none (the merge streams one set of inputs)."""
    least, most = model_counts(recipe, method)
    first = slices[0]
    for part in slices:
        n = len(part.experts)
        key = f"slices[{part.index}].sources"
        if n < least or (most and n > most):
            want = f"exactly {least}" if least == most else f"at least {least}"
            base = " besides its base" if part.has_base else ""
            raise RecipeError(
                f"{key}: '{method.name}' needs {want} models{base} per slice, "
                f"slices[{part.index}] has {n}",
                key=key,
            )
        if (n, part.has_base) != (len(first.experts), first.has_base):
            raise RecipeError(
                f"{key}: {n} models{' and a base' if part.has_base else ''}, but slices[0] has "
                f"{len(first.experts)}{' and a base' if first.has_base else ''}: every slice "
                "merges as many inputs",
                key=key,
            )
        seen = [(s.checkpoint.path, s.start) for s in part.experts]
        if len(set(seen)) < len(seen):
            notes.append(f"{key}: the same model and layers are listed twice")
    if first.has_base and recipe.conventions != "mergekit":
        notes.append(
            "slices: each slice's base is also an expert with a zero task vector "
            "(conventions: mergekit drops it from the experts)"
        )


def slice_position(offset: int, length: int, conventions: str) -> float:
    """A slice's layer ``offset`` of ``length`` for gradients: offset / (length − 1); a slice of
    one layer sits at 0 (mergecli) or 1 (mergekit)."""
    if length > 1:
        return offset / (length - 1)
    return 1.0 if conventions == "mergekit" else 0.0


def stack(
    slices: list[Slice], template: list[str], conventions: str
) -> tuple[list[Names], dict[str, tuple[Slice, float, int | None]], list[dict[str, Any]]]:
    """What each input reads under each output name, each output tensor's slice, gradient
    position and layer, and the layer map. ``template`` (the config model's tensor names)
    gives the tensors outside the layers and those of one layer."""
    names: list[Names] = [{} for _ in slices[0].inputs]
    owners: dict[str, tuple[Slice, float, int | None]] = {}
    for name in template:
        if layer_index(name) is not None:
            continue
        part = slices[0] if is_before_layers(name) else slices[-1]
        for j, source in enumerate(part.inputs):
            names[j][name] = (source.checkpoint, name)
        owners[name] = (part, parameter_position(name, 1, conventions), None)
    per_layer = [
        (prefix.rsplit(".", 1)[0], name[len(prefix) + 1 :])
        for name in template
        if layer_index(name) == 0 and (prefix := layer_prefix(name)) is not None
    ]
    layer_map: list[dict[str, Any]] = []
    for part in slices:
        for offset in range(part.length):
            layer = len(layer_map)
            position = slice_position(offset, part.length, conventions)
            for stem, rest in per_layer:
                out = f"{stem}.{layer}.{rest}"
                for j, source in enumerate(part.inputs):
                    names[j][out] = (source.checkpoint, f"{stem}.{source.start + offset}.{rest}")
                owners[out] = (part, position, layer)
            sources = [f"{s.name}:{s.start + offset}" for s in part.inputs]
            if part.has_base:
                sources[0] = f"base {sources[0]}"
            layer_map.append(
                {"layer": layer, "slice": part.index, "t": position, "sources": sources}
            )
    return names, owners, layer_map


def check_inputs(part: Slice, names: list[Names], name: str) -> TensorInfo:
    """The output tensor's info; every input holds its tensor, of one shape and kind."""
    infos = []
    for j, inputs in enumerate(names):
        checkpoint, stored = inputs[name]
        key = f"slices[{part.index}].sources[{part.inputs[j].source}]"
        if stored not in checkpoint:
            raise ShapeError(
                f"{key}: tensor '{stored}' (for '{name}') is missing from '{checkpoint.path}'",
                tensor=stored,
            )
        infos.append((key, stored, checkpoint.info(stored)))
    _, first_name, first = infos[0]
    for key, stored, info in infos[1:]:
        if (
            info.shape != first.shape
            or info.dtype.is_floating_point != first.dtype.is_floating_point
        ):
            raise ShapeError(
                f"{key}: tensor '{stored}' is {info.dtype} {list(info.shape)} in {info.file}, "
                f"'{first_name}' {first.dtype} {list(first.shape)} in {first.file}",
                tensor=stored,
            )
    return first
