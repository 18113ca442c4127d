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

from dataclasses import dataclass
from typing import Any

from mergecli.engine.checks import check_weights
from mergecli.engine.layout import plan_shards
from mergecli.engine.outputs import ModelFolder
from mergecli.engine.plan import (
    MergePlan,
    check_architectures,
    compute_dtype_of,
    majority,
    natural_key,
    output_dtype,
    resolve_device,
)
from mergecli.engine.read_plan import TensorPlan
from mergecli.engine.slice_inputs import Slice, check_counts, check_inputs, open_slice, stack
from mergecli.engine.slice_params import slice_params
from mergecli.errors import RecipeError, SourceError
from mergecli.methods import MethodSpec
from mergecli.recipe import Recipe
from mergecli.sources import Checkpoint, Source
from mergecli.sources.hub import open_checkpoint
from mergecli.sources.resolve import is_adapter, locate
from mergecli.sources.stacked import Stacked

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config keys that hold the layer count (the first one present is rewritten)."""


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
        compute_dtype_of(recipe, method, majority(float_dtypes)),
        out_dtype,
        len(layer_map),
        notes,
        None,  # check_slices refuses a new vocabulary
        method=method,
        output=ModelFolder(shards, {"mergecli_method": method.name}, config),
        statistics=method.statistics(merged, notes.append) if method.statistics else [],
        layer_map=layer_map,
    )


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
