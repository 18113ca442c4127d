"""Plan a slices merge: layer ranges of several models stacked into a new depth.

mergekit 0.1.5's rules: the output layers are the slices' layers in order; layer o of a slice
merges layer ``layer_range[0] + o`` of each of its sources (the sources of a slice cover as
many layers); the tensors before the layers (embeddings) merge the first slice's sources, those
after them (final norm, head) the last slice's. A parameter is looked up in the source's
``parameters``, then the slice's, then the recipe's; a gradient runs over each slice's own
layers. A slice's base (its ``base_model``, else the recipe's) is the source that names it.
The output's config (the recipe base's, else the first source's) gets the new layer count.

Input j of the merge is a ``Stacked`` source: input j of every slice under the output names,
so the one runner reads layer 7 of a model for output layer 12 like any other tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.conventions import parameter_position, same_model
from mergecli.engine.checks import check_weights
from mergecli.engine.layout import plan_shards
from mergecli.engine.outputs import ModelFolder
from mergecli.engine.plan import (
    MergePlan,
    check_architectures,
    compute_dtype_of,
    model_counts,
    natural_key,
    output_dtype,
    resolve_device,
)
from mergecli.engine.read_plan import TensorPlan
from mergecli.errors import RecipeError, ShapeError, SourceError
from mergecli.layers import count_layers, is_before_layers, layer_index, layer_prefix
from mergecli.methods import REQUIRED, MethodSpec, Param, Params
from mergecli.params import resolve_value
from mergecli.recipe import OutputSlice, Recipe
from mergecli.sources import Checkpoint, Source, TensorInfo
from mergecli.sources.hub import open_checkpoint
from mergecli.sources.resolve import is_adapter, locate
from mergecli.sources.stacked import Stacked

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config keys that hold the layer count (the first one present is rewritten)."""

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


@dataclass
class SlicePlan(MergePlan):
    """A merge plan whose inputs are stacked sources, with its layer map."""

    layer_map: list[dict[str, Any]]
    """Per output layer: its slice, gradient position and ``model:layer`` per input."""

    @property
    def expert_names(self) -> list[str]:
        """Each input's models' names joined by '+' (``math+code``)."""
        return [e.label for e in self.experts]

    def summary(self) -> dict[str, Any]:
        layers = [
            f"{e['layer']} ← slices[{e['slice']}]: {', '.join(e['sources'])}"
            for e in self.layer_map
        ]
        summary = super().summary()
        warnings = summary.pop("warnings")
        return {**summary, "layers": layers, "warnings": warnings}


Opener = Callable[[str, str], Checkpoint]


def plan_slices(
    recipe: Recipe, method: MethodSpec, device: str, shard_bytes: int, notes: list[str]
) -> SlicePlan:
    """Validate a slices recipe against the checkpoints' headers and plan its merge."""
    assert recipe.slices
    torch_device = resolve_device(device)
    opened: dict[str, Checkpoint] = {}

    def checkpoint(value: str, key: str) -> Checkpoint:
        if value not in opened:
            folder = locate(recipe, value, key)
            if is_adapter(folder):
                raise RecipeError(
                    f"{key}: '{folder}' is a PEFT adapter; slices stack full checkpoints", key=key
                )
            opened[value] = open_checkpoint(folder, key, allow_bin=recipe.allow_bin)
        return opened[value]

    slices = [
        open_slice(recipe, method, i, part, checkpoint) for i, part in enumerate(recipe.slices)
    ]
    check_counts(recipe, method, slices, notes)
    first = recipe.slices[0].sources[0].model
    config_model = (
        checkpoint(recipe.base_model, "base_model")
        if recipe.base_model
        else checkpoint(first, "slices[0].sources[0].model")
    )
    check_architectures([config_model, *[c for c in opened.values() if c is not config_model]])

    template = sorted(config_model.tensor_names(), key=natural_key)
    names, owners, layer_map = stack(slices, template, recipe.conventions)
    float_dtypes = [
        config_model.info(n).dtype for n in template if config_model.info(n).dtype.is_floating_point
    ]
    if not float_dtypes:
        raise SourceError(
            f"{config_model.label}: '{config_model.path}' has no floating-point tensors",
            path=config_model.path,
        )
    out_dtype = output_dtype(recipe, float_dtypes)
    tensors = []
    for name in sorted(owners, key=natural_key):
        part, position, layer = owners[name]
        info = check_inputs(part, names, name)
        if not info.dtype.is_floating_point:
            tensors.append(TensorPlan(name, info.shape, info.dtype, merge=False))
            continue
        stored = [names[j][name][1] for j in range(len(names))]
        params = slice_params(recipe, method, part, name, stored, position)
        if method.check:
            method.check(params, name)
        tensors.append(TensorPlan(name, info.shape, out_dtype, True, params, layer))

    paths = [config_model.path] + [i.checkpoint.path for i in slices[0].inputs[1:]]
    stacked = [Stacked(input_label(slices, j), names[j], path) for j, path in enumerate(paths)]
    has_base = slices[0].has_base
    experts: list[Source] = list(stacked[1:] if has_base else stacked)
    merged = {t.name: t.params for t in tensors if t.merge}
    notes += check_weights(method, merged)
    shards = plan_shards([(t.name, t.shape, t.out_dtype) for t in tensors], shard_bytes)
    config = output_config(slices, layer_map, config_model)
    return SlicePlan(
        recipe,
        stacked[0] if has_base else None,
        experts,
        tensors,
        torch_device,
        compute_dtype_of(recipe),
        out_dtype,
        len(layer_map),
        notes,
        method=method,
        output=ModelFolder(shards, {"mergecli_method": method.name}, config),
        statistics=method.statistics(merged, notes.append) if method.statistics else [],
        layer_map=layer_map,
    )


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


def slice_params(
    recipe: Recipe,
    method: MethodSpec,
    part: Slice,
    name: str,
    stored: list[str],
    position: float,
) -> Params:
    """One output tensor's parameters: per model, the source's value, else the slice's, else
    the recipe's (the first whose filters match, evaluated at ``position``), else the default;
    a per-model value's filters see the source's tensor name, the others the output's."""
    at = f"slices[{part.index}]"
    shared = [(part.definition.parameters, f"{at}.parameters"), (recipe.parameters, "parameters")]
    offset = 1 if part.has_base else 0
    out: Params = {}
    for param in method.params:
        if not param.per_model:
            out[param.name] = lookup(recipe, method, param, shared, name, position)
            continue
        out[param.name] = [
            lookup(
                recipe,
                method,
                param,
                [(e.parameters, f"{at}.sources[{e.source}].parameters"), *shared],
                stored[offset + k],
                position,
            )
            for k, e in enumerate(part.experts)
        ]
    out["conventions"] = recipe.conventions
    return out


def lookup(
    recipe: Recipe,
    method: MethodSpec,
    param: Param,
    levels: list[tuple[dict[str, Any], str]],
    tensor: str,
    position: float,
) -> Any:
    """The first value of ``param`` in ``levels`` that applies to ``tensor``, else its default."""
    for values, where in levels:
        if param.name in values:
            raw = resolve_value(values[param.name], tensor, position, recipe.conventions)
            if raw is not None and raw is not REQUIRED:
                return param.coerce(raw, f"{where}.{param.name}")
    if param.required:
        key = f"{levels[0][1]}.{param.name}"
        raise RecipeError(f"{key}: '{method.name}' needs '{param.name}' (for {tensor})", key=key)
    return param.default_for(recipe.conventions)


def input_label(slices: list[Slice], j: int) -> str:
    """Input j's name: its models' names, in order, joined by '+'."""
    return "+".join(dict.fromkeys(part.inputs[j].name for part in slices))


def output_config(
    slices: list[Slice], layer_map: list[dict[str, Any]], config_model: Checkpoint
) -> dict[str, Any]:
    """The config keys the stacked model changes: its layer count, and a per-layer list
    (``layer_types``) taken from the layers that input 0 reads."""
    config = config_model.config() or {}
    changes: dict[str, Any] = {}
    key = next((k for k in LAYER_COUNT_KEYS if k in config), None)
    if key is not None:
        changes[key] = len(layer_map)
    types = []
    for part in slices:
        source = part.inputs[0]
        listed = (source.checkpoint.config() or {}).get("layer_types")
        if not isinstance(listed, list):
            return changes
        types += listed[source.start : source.start + part.length]
    if "layer_types" in config:
        changes["layer_types"] = types
    return changes
