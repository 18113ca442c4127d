"""Plan a merge from headers alone: inputs, tensors, parameters, shards, passes and memory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from mergecli.engine.checks import adapter_warnings, check_bounds, check_weights, model_warnings
from mergecli.engine.layout import Shard, files_bytes, parse_size, plan_shards
from mergecli.engine.lora_output import LoraLayout, plan_lora_output
from mergecli.engine.task_artifact import TaskArtifactLayout, plan_task_artifact
from mergecli.errors import MergeError, did_you_mean
from mergecli.layers import count_layers, layer_index, layer_position
from mergecli.methods import REQUIRED, MethodSpec, Param, Params, get_method
from mergecli.methods.inputs import row_chunks
from mergecli.methods.statistics import Statistic
from mergecli.params import resolve_value
from mergecli.recipe import Recipe
from mergecli.sources import Checkpoint, Source, open_models

LOOKAHEAD = 2
"""Pieces (tensors or row chunks) read ahead of the one being merged, at most."""
READ_AHEAD_BYTES = 256 * 2**20
"""Bytes read ahead, at most: a larger tensor (merged whole) is read when the merge reaches it,
not while the previous one is merged."""
CHUNK_ELEMENTS = 1 << 20
"""Entries of one row chunk: tensors merged elementwise, and copied tensors, are read, merged
and written in chunks of about this size, so memory does not grow with the largest tensor."""

Rows = tuple[int, int] | None
"""Rows ``start:stop`` of a tensor, or None for the whole tensor."""


@dataclass
class TensorPlan:
    """One output tensor: merged from the inputs, or copied from the reference model."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool
    params: Params = field(default_factory=dict)
    layer: int | None = None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class MergePlan:
    """Everything decided before the first tensor is read."""

    recipe: Recipe
    method: MethodSpec
    base: Checkpoint | None
    experts: list[Source]
    tensors: list[TensorPlan]
    shards: list[Shard]
    device: torch.device
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    num_layers: int
    statistics: list[Statistic]
    warnings: list[str]
    artifact: TaskArtifactLayout | None = None
    """The artifact's layout when the method writes a task-conditional artifact (emr,
    tall_masks) rather than one model (``shards``)."""
    lora: LoraLayout | None = None
    """The adapter's layout with ``output_format: lora`` (then ``shards`` is its one file)."""

    @property
    def reference(self) -> Source:
        """The model that supplies layout, config and copied tensors."""
        return self.base or self.experts[0]

    @property
    def uses_base(self) -> bool:
        """Whether the base is read: the method uses it, an expert is an adapter, or the
        output is an adapter (of merged − base)."""
        return self.base is not None and (
            self.method.base != "unused"
            or self.lora is not None
            or any(e.delta for e in self.experts)
        )

    @property
    def expert_names(self) -> list[str]:
        return [self.recipe.model_name(i) for i in range(len(self.experts))]

    def pieces(self, tensor: TensorPlan) -> list[Rows]:
        """The row chunks in which a tensor streams: several when it is copied or merged
        elementwise into a model, its sources read rows cheaply and it is larger than
        CHUNK_ELEMENTS; else the whole tensor."""
        chunked = (
            not tensor.merge or (self.lora is None and self.method.is_elementwise(tensor.params))
        ) and all(s.row_reads for s in self.read_sources(tensor))
        chunks = row_chunks(tensor.shape, CHUNK_ELEMENTS) if chunked else None
        return [None] if chunks is None else list(chunks)

    def piece_bytes(self, tensor: TensorPlan, rows: Rows) -> int:
        """Memory that one piece's inputs take once read (in the compute dtype when merged)."""
        item = self.compute_dtype.itemsize if tensor.merge else 0
        return _numel(tensor, rows) * sum(
            max(s.info(tensor.name).dtype.itemsize, item) for s in self.read_sources(tensor)
        )

    def read_sources(self, tensor: TensorPlan) -> list[Source]:
        if not tensor.merge:
            return [self.reference]
        return ([self.base] if self.uses_base and self.base else []) + self.experts

    @property
    def passes(self) -> int:
        return 1 + sum(s.passes(self.compute_dtype) for s in self.statistics)

    @property
    def bytes_per_pass(self) -> int:
        return sum(src.info(t.name).nbytes for t in self.tensors for src in self.read_sources(t))

    @property
    def bytes_to_read(self) -> int:
        stat_bytes = sum(
            src.info(t.name).nbytes for t in self.tensors if t.merge for src in self.read_sources(t)
        )
        return self.bytes_per_pass + (self.passes - 1) * stat_bytes

    @property
    def bytes_to_write(self) -> int:
        if self.artifact is not None:
            return self.artifact.nbytes
        return sum(s.nbytes for s in self.shards)

    @property
    def peak_memory_estimate(self) -> int:
        """Process baseline + prefetched inputs + method temporaries + queued writes (bytes)."""
        largest = max((_numel(t, rows) for t in self.tensors for rows in self.pieces(t)), default=0)
        inputs = 1 + len(self.experts)
        compute = largest * self.compute_dtype.itemsize
        stored = largest * max(self.out_dtype.itemsize, 4)
        working = (LOOKAHEAD + 1) * inputs * (compute + stored) + (inputs + 3) * compute
        return psutil.Process().memory_info().rss + working + 2 * stored

    def summary(self) -> dict[str, Any]:
        artifact = (
            {
                "artifact_tasks": self.artifact.tasks,
                "artifact_size_in_models": self.artifact.size_in_models,
            }
            if self.artifact
            else {}
        )
        return {
            "method": self.method.name,
            "output": self.method.output,
            "output_format": self.recipe.output_format,
            "base": str(self.base.path) if self.base else None,
            "experts": [str(e.path) for e in self.experts],
            "tensors": len(self.tensors),
            "merged_tensors": sum(t.merge for t in self.tensors),
            "copied_tensors": sum(not t.merge for t in self.tensors),
            "shards": len(self.shards),
            "passes": self.passes,
            "bytes_to_read": self.bytes_to_read,
            "bytes_to_write": self.bytes_to_write,
            "peak_memory_estimate": self.peak_memory_estimate,
            "device": str(self.device),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "out_dtype": str(self.out_dtype).removeprefix("torch."),
            **artifact,
            "warnings": self.warnings,
        }


def _numel(tensor: TensorPlan, rows: Rows) -> int:
    return tensor.numel if rows is None else tensor.numel // tensor.shape[0] * (rows[1] - rows[0])


def natural_key(name: str) -> list[Any]:
    """Sort key that orders layer 10 after layer 9."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise MergeError(f"--device: '{device}' is not cpu, cuda or auto")
    return torch.device(device)


def check_architectures(models: list[Source]) -> None:
    ref = models[0].config() or {}
    for other in models[1:]:
        cfg = other.config() or {}
        for key in ("model_type", "architectures"):
            if ref.get(key) and cfg.get(key) and ref[key] != cfg[key]:
                raise MergeError(
                    f"{other.label}: {key} {cfg[key]} in {other.path / 'config.json'} differs "
                    f"from {ref[key]} of {models[0].label}"
                )


def check_parameter_names(recipe: Recipe, method: MethodSpec) -> list[str]:
    """Unknown parameters are errors; accepted-but-ignored ones become warnings."""
    notes = []
    known = [*method.param_names, *method.ignored]
    places = [("parameters", recipe.parameters, False)] + [
        (f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(recipe.models)
    ]
    for where, values, per_model_place in places:
        for key in values:
            if key in method.ignored:
                notes.append(f"{where}.{key} ignored: {method.ignored[key]}")
                continue
            param = method.param(key)
            if param is None:
                raise MergeError(
                    f"{where}.{key}: '{method.name}' has no parameter '{key}'"
                    f"{did_you_mean(key, known)}; it takes: "
                    f"{', '.join(method.param_names) or 'none'}"
                )
            if per_model_place and not param.per_model:
                raise MergeError(
                    f"{where}.{key}: '{key}' applies to the whole merge; set it under parameters"
                )
    return notes


def resolve_params(recipe: Recipe, method: MethodSpec, name: str, position: float) -> Params:
    """The parameters of one tensor: per-model value, else global value, else default."""
    out: Params = {}
    for param in method.params:

        def one(raw: Any, key: str, param: Param = param) -> Any:
            value = resolve_value(raw, name, position)
            if value is None or value is REQUIRED:
                if param.required:
                    raise MergeError(f"{key}: '{method.name}' needs '{param.name}' (for {name})")
                return param.default
            return param.coerce(value, key)

        glob = recipe.parameters.get(param.name, param.default)
        if param.per_model:
            out[param.name] = [
                one(m.parameters.get(param.name, glob), f"models[{i}].parameters.{param.name}")
                for i, m in enumerate(recipe.models)
            ]
        else:
            out[param.name] = one(glob, f"parameters.{param.name}")
    return out


def check_tensor(plan_ref: Source, expert: Source, name: str, on_missing: str) -> bool:
    """Whether the expert has a compatible tensor; errors name the tensor, file and recipe key."""
    if name not in expert:
        if on_missing == "base":
            return False
        raise MergeError(
            f"{expert.label}: tensor '{name}' is missing from '{expert.path}' "
            "(set on_missing: base to keep the base's value)"
        )
    ref, got = plan_ref.info(name), expert.info(name)
    if ref.shape != got.shape:
        raise MergeError(
            f"{expert.label}: tensor '{name}' has shape {list(got.shape)} in {got.file}, "
            f"expected {list(ref.shape)} as in {ref.file}"
        )
    if ref.dtype.is_floating_point != got.dtype.is_floating_point:
        raise MergeError(
            f"{expert.label}: tensor '{name}' is {got.dtype} in {got.file}, "
            f"but {ref.dtype} in {ref.file}"
        )
    return True


def plan_merge(recipe: Recipe, device: str = "cpu", shard_size: str | int = "5GB") -> MergePlan:
    """Validate a recipe against the checkpoints' headers and decide the whole merge."""
    if recipe.temporal is not None:
        raise MergeError("temporal: this recipe folds experts over time; run 'mergecli temporal'")
    method = get_method(recipe.merge_method).resolve(recipe.parameters)
    notes = check_parameter_names(recipe, method)
    check_bounds(recipe, method)
    notes += model_warnings(recipe)
    n = len(recipe.models)
    if n < method.min_models or (method.max_models and n > method.max_models):
        want = (
            f"exactly {method.min_models}"
            if method.min_models == method.max_models
            else f"at least {method.min_models}"
        )
        raise MergeError(f"models: '{method.name}' needs {want} models, the recipe lists {n}")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise MergeError(f"--shard-size: {exc}") from None
    torch_device = resolve_device(device)

    base, experts = open_models(recipe)
    notes += adapter_warnings(recipe, base, experts)
    if method.base == "required" and base is None:
        raise MergeError(f"base_model: '{method.name}' needs a base model")
    reference = base or experts[0]
    check_architectures([reference, *[e for e in experts if e is not reference]])

    names = sorted(reference.tensor_names(), key=natural_key)
    num_layers = count_layers(names)
    float_dtypes = [
        reference.info(x).dtype for x in names if reference.info(x).dtype.is_floating_point
    ]
    if not float_dtypes:
        raise MergeError(f"{reference.label}: '{reference.path}' has no floating-point tensors")
    out_dtype = (
        getattr(torch, recipe.out_dtype)
        if recipe.out_dtype
        else max(set(float_dtypes), key=float_dtypes.count)
    )
    compute_dtype = torch.float64 if recipe.dtype == "float64" else torch.float32

    tensors: list[TensorPlan] = []
    for name in names:
        info = reference.info(name)
        present = [
            check_tensor(reference, e, name, recipe.on_missing)
            for e in experts
            if e is not reference
        ]
        if not info.dtype.is_floating_point:
            notes += differing_buffer(name, reference, experts)
            tensors.append(TensorPlan(name, info.shape, info.dtype, merge=False))
            continue
        if not all(present):
            notes.append(f"{name}: missing from an expert, kept from the base (on_missing: base)")
            tensors.append(TensorPlan(name, info.shape, out_dtype, merge=False))
            continue
        params = resolve_params(recipe, method, name, layer_position(name, num_layers))
        if method.check:
            method.check(params, name)
        tensors.append(TensorPlan(name, info.shape, out_dtype, True, params, layer_index(name)))
    extra = sorted({x for e in experts for x in e.tensor_names()} - set(names))
    if extra:
        notes.append(f"{len(extra)} tensors only in experts are not written (e.g. {extra[0]})")

    notes += check_weights(method, {t.name: t.params for t in tensors if t.merge})
    statistics = (
        method.statistics({t.name: t.params for t in tensors if t.merge}, notes.append)
        if method.statistics
        else []
    )
    specs = [(t.name, t.shape, t.out_dtype) for t in tensors]
    artifact = lora = None
    if recipe.output_format == "lora":
        merged = {t.name: t.params for t in tensors if t.merge}
        lora_dtype = getattr(torch, recipe.out_dtype or "float32")
        lora = plan_lora_output(recipe, method, base, experts, merged, lora_dtype)
        shards = [lora.shard]
    else:
        shards = plan_shards(specs, shard_bytes)
    if method.output == "task_masks":
        metadata = {"mergecli_method": method.name}
        artifact = plan_task_artifact(
            specs,
            [(t.name, t.shape, t.out_dtype) for t in tensors if t.merge],
            [recipe.model_name(i) for i in range(n)],
            shard_bytes,
            files_bytes(shards, metadata),
            metadata,
        )
    return MergePlan(
        recipe,
        method,
        base,
        experts,
        tensors,
        shards,
        torch_device,
        compute_dtype,
        out_dtype,
        num_layers,
        statistics,
        notes,
        artifact,
        lora,
    )


def differing_buffer(name: str, reference: Source, experts: list[Source]) -> list[str]:
    """Warnings for non-floating tensors (copied from the reference) that a full expert changes
    (adapters hold task vectors, never a buffer's value)."""
    value = reference.read(name)
    return [
        f"{name}: non-floating tensor differs in {e.label} ({e.path}); the base's value is kept"
        for e in experts
        if e is not reference and not e.delta and name in e and not torch.equal(e.read(name), value)
    ]
