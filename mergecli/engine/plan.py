"""Plan a merge from headers alone: inputs, tensors, parameters, shards, passes and memory."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from mergecli.conventions import apply_conventions, parameter_position
from mergecli.engine.checks import adapter_warnings, check_bounds, check_weights, model_warnings
from mergecli.engine.layout import files_bytes, parse_size, plan_shards
from mergecli.engine.lora_output import LoraAdapter, plan_lora_output
from mergecli.engine.outputs import MergeOutput, ModelFolder, RowPolicy, Target
from mergecli.engine.read_plan import (
    LOOKAHEAD,
    ReadPlan,
    Rows,
    TensorPlan,
    observed,
    piece_numel,
    whole,
)
from mergecli.engine.task_artifact import TaskMaskArtifact, plan_task_artifact
from mergecli.errors import (
    RecipeError,
    ShapeError,
    SourceError,
    UnknownParameterError,
    did_you_mean,
)
from mergecli.layers import count_layers, layer_index
from mergecli.methods import REQUIRED, MethodSpec, Param, Params, get_method
from mergecli.methods.inputs import row_chunks
from mergecli.methods.statistics import Statistic
from mergecli.params import resolve_value
from mergecli.recipe import Recipe
from mergecli.sources import Checkpoint, Source, open_models
from mergecli.sources.stacked import Stacked
from mergecli.vocab import Vocabulary, plan_vocabulary

CHUNK_ELEMENTS = 1 << 20
"""Entries of one row chunk: tensors merged elementwise, and copied tensors, are read, merged
and written in chunks of about this size, so memory does not grow with the largest tensor."""


@dataclass
class InputPlan:
    """The models of a recipe, checked against each other from headers: every tensor, merged
    or copied, in order."""

    recipe: Recipe
    base: Checkpoint | Stacked | None
    """The base; a slices merge's inputs are ``Stacked`` (``engine/slices.py``)."""
    experts: list[Source]
    tensors: list[TensorPlan]
    device: torch.device
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    num_layers: int
    warnings: list[str]
    vocabulary: Vocabulary | None
    """The output's new vocabulary (``tokenizer_source: union``, the ``tokenizer:`` section),
    onto which every input's embeddings and heads are remapped; None when it is copied."""

    @property
    def reference(self) -> Source:
        """The model that supplies layout, config and copied tensors."""
        return self.base or self.experts[0]

    @property
    def expert_names(self) -> list[str]:
        return [self.recipe.model_name(i) for i in range(len(self.experts))]

    @property
    def tokenizer_folder(self) -> Path:
        """The folder whose tokenizer is copied: the recipe's ``tokenizer_source``, or the
        reference model's (a new vocabulary is written by ``vocabulary`` instead)."""
        source = self.recipe.tokenizer_source
        if source and source not in ("base", "union"):
            return self.recipe.resolve_path(source)
        return self.reference.path

    def reading(
        self,
        tensors: list[TensorPlan] | None = None,
        with_base: bool = True,
        pieces: Callable[[TensorPlan], list[Rows]] = whole,
    ) -> ReadPlan:
        """The reads of ``tensors`` (all of them by default), whole unless ``pieces`` says
        otherwise; ``with_base`` reads the base for every merged tensor."""
        return ReadPlan(
            self.tensors if tensors is None else tensors,
            pieces,
            self.base if with_base else None,
            self.experts,
            self.reference,
            self.device,
            self.compute_dtype,
            self.recipe.seed,
            self.num_layers,
            self.recipe.on_nonfinite,
            self.warnings,
        )


@dataclass
class MergePlan(InputPlan):
    """Everything decided before the first tensor is read."""

    method: MethodSpec
    output: MergeOutput
    """Where the merged tensors go: a model folder, a LoRA adapter or a task-mask artifact."""
    statistics: list[Statistic]

    def target(self) -> Target:
        """What the output is told: the reference model's files, the tokenizer's folder, the
        output dtype, the method and the recipe's chat template over the inputs."""
        return Target(
            self.out_dtype,
            self.reference.path,
            self.tokenizer_folder,
            self.method.name,
            self.recipe.chat_template,
            tuple(s.path for s in (self.base, *self.experts) if s),
            vocabulary=self.vocabulary,
        )

    @property
    def uses_base(self) -> bool:
        """Whether the base is read: the method uses it, an expert is an adapter, or the
        output is an adapter (of merged − base)."""
        return self.base is not None and (
            self.method.base != "unused"
            or self.output.reads_base
            or any(e.delta for e in self.experts)
        )

    def pieces(self, tensor: TensorPlan, output: RowPolicy | None = None) -> list[Rows]:
        """The row chunks in which a tensor streams into ``output`` (the plan's by default):
        several when the output takes row pieces of it (a merged one when the method is
        elementwise), its sources read rows cheaply and it is larger than CHUNK_ELEMENTS; else
        the whole tensor."""
        output = output or self.output
        chunked = (
            output.merged_rows and self.method.is_elementwise(tensor.params)
            if tensor.merge
            else output.copied_rows
        ) and all(s.row_reads for s in self.reading(with_base=self.uses_base).sources(tensor))
        chunks = row_chunks(tensor.shape, CHUNK_ELEMENTS) if chunked else None
        return [None] if chunks is None else list(chunks)

    def streams(self, tensor: TensorPlan) -> bool:
        """Whether ``tensor`` is merged in row pieces."""
        return tensor.merge and len(self.pieces(tensor)) > 1

    def read_plan(
        self,
        tensors: list[TensorPlan] | None = None,
        output: RowPolicy | None = None,
        with_base: bool = False,
    ) -> ReadPlan:
        """The reads of ``tensors`` (all of them by default) in the pieces ``output`` takes;
        ``with_base`` reads the base for every merged tensor (task vectors need it)."""
        return self.reading(tensors, self.uses_base or with_base, lambda t: self.pieces(t, output))

    def merge_reads(
        self, output: MergeOutput | None = None, tensors: list[TensorPlan] | None = None
    ) -> ReadPlan:
        """The merge pass's reads of ``tensors`` (all by default) into ``output`` (the plan's by
        default). Where the output stores the method's result as it is (a model), the method
        is offered the output dtype; where it also takes inputs as stored for every merged
        tensor (float32 compute on the CPU), bfloat16 inputs arrive as stored and the
        finite-value guard is left to the merge (its compiled loop checks every entry as it
        reads)."""
        output = output or self.output
        stored = (
            output.stores_result
            and self.device.type == "cpu"
            and self.compute_dtype == torch.float32
            and all(self.method.takes_stored(t.params) for t in self.tensors if t.merge)
        )
        return replace(
            self.read_plan(tensors, output=output),
            keep_bfloat16=stored,
            check_reads=not stored,
            offer_out_dtype=output.stores_result,
        )

    @property
    def passes(self) -> int:
        """The statistics passes (which the statistics share) and the merge."""
        return 1 + max((s.passes(self.compute_dtype) for s in self.statistics), default=0)

    @property
    def bytes_per_pass(self) -> int:
        return self.read_plan().nbytes

    @property
    def bytes_to_read(self) -> int:
        """The merge pass's bytes and each statistics pass's (the tensors its statistics
        observe)."""
        stat_bytes = 0
        for number in range(1, self.passes):
            active = [s for s in self.statistics if s.passes(self.compute_dtype) >= number]
            stat_bytes += self.read_plan(observed(self.tensors, active)).nbytes
        return self.bytes_per_pass + stat_bytes

    def keep_streamed(self) -> None:
        """Narrow each per-tensor statistic to the tensors merged in row pieces (the method
        takes a whole tensor's own statistic from it); drop those left with none."""
        for s in self.statistics:
            if s.tensors is not None:
                wanted = s.tensors
                s.tensors = {t.name for t in self.tensors if t.name in wanted and self.streams(t)}
        self.statistics = [s for s in self.statistics if s.tensors is None or s.tensors]

    @property
    def bytes_to_write(self) -> int:
        return self.output.nbytes

    @property
    def peak_memory_estimate(self) -> int:
        """Process baseline + prefetched inputs + method temporaries + queued writes (bytes)."""
        largest = max(
            (piece_numel(t, rows) for t in self.tensors for rows in self.pieces(t)), default=0
        )
        inputs = 1 + len(self.experts)
        compute = largest * self.compute_dtype.itemsize
        stored = largest * max(self.out_dtype.itemsize, 4)
        working = (LOOKAHEAD + 1) * inputs * (compute + stored) + (inputs + 3) * compute
        return psutil.Process().memory_info().rss + working + 2 * stored

    def summary(self) -> dict[str, Any]:
        shards, *extra = self.output.summary().items()
        return {
            "method": self.method.name,
            "output": self.method.output,
            "output_format": self.recipe.output_format,
            "base": str(self.base.path) if self.base else None,
            "experts": [str(e.path) for e in self.experts],
            "tensors": len(self.tensors),
            "merged_tensors": sum(t.merge for t in self.tensors),
            "copied_tensors": sum(not t.merge for t in self.tensors),
            "shards": shards[1],
            "passes": self.passes,
            "bytes_to_read": self.bytes_to_read,
            "bytes_to_write": self.bytes_to_write,
            "peak_memory_estimate": self.peak_memory_estimate,
            "device": str(self.device),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "out_dtype": str(self.out_dtype).removeprefix("torch."),
            **dict(extra),
            **(
                {"vocabulary": {"tokens": len(v.tokens), "rows": v.rows}}
                if (v := self.vocabulary)
                else {}
            ),
            "warnings": self.warnings,
        }


def natural_key(name: str) -> list[Any]:
    """Sort key that orders layer 10 after layer 9."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(
            f"--device {device}: CUDA is not available on this machine", key="--device"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise RecipeError(f"--device: '{device}' is not cpu, cuda or auto", key="--device")
    return torch.device(device)


def check_architectures(models: list[Source]) -> None:
    ref = models[0].config() or {}
    for other in models[1:]:
        cfg = other.config() or {}
        for key in ("model_type", "architectures"):
            if ref.get(key) and cfg.get(key) and ref[key] != cfg[key]:
                raise SourceError(
                    f"{other.label}: {key} {cfg[key]} in {other.path / 'config.json'} differs "
                    f"from {ref[key]} of {models[0].label}",
                    path=other.path / "config.json",
                )


def check_parameter_names(recipe: Recipe, method: MethodSpec) -> list[str]:
    """Unknown parameters are errors; accepted-but-ignored ones become warnings."""
    notes = []
    known = [*method.param_names, *method.ignored]
    for where, values, per_model_place in recipe.parameter_places():
        for key in values:
            if key in method.ignored:
                notes.append(f"{where}.{key} ignored: {method.ignored[key]}")
                continue
            param = method.param(key)
            if param is None:
                raise UnknownParameterError(
                    f"{where}.{key}: '{method.name}' has no parameter '{key}'"
                    f"{did_you_mean(key, known)}; it takes: "
                    f"{', '.join(method.param_names) or 'none'}",
                    method=method.name,
                    parameter=key,
                    key=f"{where}.{key}",
                )
            if per_model_place and not param.per_model:
                raise RecipeError(
                    f"{where}.{key}: '{key}' applies to the whole merge; set it under parameters",
                    key=f"{where}.{key}",
                )
    return notes


def resolve_params(recipe: Recipe, method: MethodSpec, name: str, position: float) -> Params:
    """The parameters of one tensor: per-model value, else global value, else default (of the
    recipe's conventions); ``conventions`` too, for the methods that follow mergekit's."""
    conventions = recipe.conventions
    out: Params = {}
    for param in method.params:
        default = param.default_for(conventions)

        def one(raw: Any, key: str, param: Param = param, default: Any = default) -> Any:
            value = resolve_value(raw, name, position, conventions)
            if value is None or value is REQUIRED:
                if param.required:
                    raise RecipeError(
                        f"{key}: '{method.name}' needs '{param.name}' (for {name})", key=key
                    )
                return default
            return param.coerce(value, key)

        glob = recipe.parameters.get(param.name, default)
        if param.per_model:
            out[param.name] = [
                one(m.parameters.get(param.name, glob), f"models[{i}].parameters.{param.name}")
                for i, m in enumerate(recipe.models)
            ]
        else:
            out[param.name] = one(glob, f"parameters.{param.name}")
    out["conventions"] = conventions
    return out


def check_tensor(plan_ref: Source, expert: Source, name: str, on_missing: str) -> bool:
    """Whether the expert has a compatible tensor; errors name the tensor, file and recipe key."""
    if name not in expert:
        if on_missing == "base":
            return False
        raise ShapeError(
            f"{expert.label}: tensor '{name}' is missing from '{expert.path}' "
            "(set on_missing: base to keep the base's value)",
            tensor=name,
        )
    ref, got = plan_ref.info(name), expert.info(name)
    if ref.shape != got.shape:
        raise ShapeError(
            f"{expert.label}: tensor '{name}' has shape {list(got.shape)} in {got.file}, "
            f"expected {list(ref.shape)} as in {ref.file}",
            tensor=name,
        )
    if ref.dtype.is_floating_point != got.dtype.is_floating_point:
        raise ShapeError(
            f"{expert.label}: tensor '{name}' is {got.dtype} in {got.file}, "
            f"but {ref.dtype} in {ref.file}",
            tensor=name,
        )
    return True


def plan_merge(
    recipe: Recipe,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    *,
    experts_selected: bool = False,
) -> MergePlan:
    """Validate a recipe against the checkpoints' headers and decide the whole merge.

    A method that selects its experts by scoring merges (greedy_soup) is refused unless
    ``experts_selected`` says the recipe lists the selected experts
    (``mergecli.evaluate.plan_with_selection`` runs the selection and plans the result).
    """
    if recipe.temporal is not None:
        raise RecipeError(
            "temporal: this recipe folds experts over time; run 'mergecli temporal'", key="temporal"
        )
    method = get_method(recipe.merge_method).resolve(recipe.parameters)
    if method.selects_experts and not experts_selected:
        raise RecipeError(
            f"merge_method: '{method.name}' selects its experts by scoring merges; "
            "mergecli.evaluate.plan_with_selection(recipe) runs the selection and plans it",
            key="merge_method",
        )
    recipe, notes = apply_conventions(recipe, method)
    notes += check_parameter_names(recipe, method)
    check_bounds(recipe, method)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"--shard-size: {exc}", key="--shard-size") from None
    if recipe.slices:
        from mergecli.engine.slices import plan_slices  # it builds on this module

        return plan_slices(recipe, method, device, shard_bytes, notes)
    notes += model_warnings(recipe)
    n = len(recipe.models)
    least, most = model_counts(recipe, method)
    if n < least or (most and n > most):
        want = f"exactly {least}" if least == most else f"at least {least}"
        raise RecipeError(
            f"models: '{method.name}' needs {want} models, the recipe lists {n}", key="models"
        )
    inputs = plan_inputs(recipe, device, method, notes)
    tensors = inputs.tensors
    notes += check_weights(method, {t.name: t.params for t in tensors if t.merge})
    statistics = (
        method.statistics({t.name: t.params for t in tensors if t.merge}, notes.append)
        if method.statistics
        else []
    )
    output = plan_output(recipe, method, inputs.base, inputs.experts, tensors, shard_bytes)
    plan = MergePlan(**vars(inputs), method=method, output=output, statistics=statistics)
    plan.keep_streamed()
    return plan


def model_counts(recipe: Recipe, method: MethodSpec) -> tuple[int, int | None]:
    """The least and most experts the method takes under the recipe's conventions."""
    if recipe.conventions == "mergekit" and method.mergekit_models is not None:
        return method.mergekit_models
    return method.min_models, method.max_models


def plan_inputs(
    recipe: Recipe,
    device: str = "cpu",
    method: MethodSpec | None = None,
    notes: list[str] | None = None,
) -> InputPlan:
    """Open the recipe's models and check them against each other from headers: which tensors
    are merged (with ``method``'s parameters resolved and checked, when given) and which copied."""
    notes = [] if notes is None else notes
    torch_device = resolve_device(device)

    base, experts = open_models(recipe)
    notes += adapter_warnings(recipe, base, experts)
    if method and method.base == "required" and base is None:
        raise RecipeError(f"base_model: '{method.name}' needs a base model", key="base_model")
    vocabulary = plan_vocabulary(recipe, base, experts, notes)
    reference = base or experts[0]
    check_architectures([reference, *[e for e in experts if e is not reference]])

    names = sorted(reference.tensor_names(), key=natural_key)
    num_layers = count_layers(names)
    float_dtypes = [
        reference.info(x).dtype for x in names if reference.info(x).dtype.is_floating_point
    ]
    if not float_dtypes:
        raise SourceError(
            f"{reference.label}: '{reference.path}' has no floating-point tensors",
            path=reference.path,
        )
    out_dtype = output_dtype(recipe, float_dtypes)
    compute_dtype = compute_dtype_of(recipe, method, majority(float_dtypes))

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
        params = (
            resolve_params(
                recipe, method, name, parameter_position(name, num_layers, recipe.conventions)
            )
            if method
            else {}
        )
        if method and method.check:
            method.check(params, name)
        tensors.append(TensorPlan(name, info.shape, out_dtype, True, params, layer_index(name)))
    extra = sorted({x for e in experts for x in e.tensor_names()} - set(names))
    if extra:
        notes.append(f"{len(extra)} tensors only in experts are not written (e.g. {extra[0]})")

    return InputPlan(
        recipe,
        base,
        experts,
        tensors,
        torch_device,
        compute_dtype,
        out_dtype,
        num_layers,
        notes,
        vocabulary,
    )


def output_dtype(recipe: Recipe, float_dtypes: list[torch.dtype]) -> torch.dtype:
    """``out_dtype``, else (mergekit's conventions) ``dtype`` when given, else the dtype most of
    the reference's floating-point tensors have."""
    given_dtype = recipe.out_dtype
    mergekit = recipe.conventions == "mergekit"
    if given_dtype is None and mergekit and "dtype" in recipe.model_fields_set:
        given_dtype = recipe.dtype  # mergekit writes in dtype when out_dtype is unset
    if given_dtype:
        dtype: torch.dtype = getattr(torch, given_dtype)
        return dtype
    return majority(float_dtypes)


def majority(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype most of the reference's floating-point tensors are stored in."""
    return max(set(dtypes), key=dtypes.count)


def compute_dtype_of(
    recipe: Recipe, method: MethodSpec | None = None, stored: torch.dtype = torch.float32
) -> torch.dtype:
    """The dtype tensors are merged in: float32 (float64 when ``dtype`` is float64).

    Under mergekit's conventions a method that mergekit 0.1.5 computes in the dtype it loads
    tensors in (``MethodSpec.mergekit_compute``) runs in ``dtype``, or in the ``stored`` dtype
    when the recipe leaves ``dtype`` unset (mergekit then keeps tensors as stored).
    """
    if recipe.conventions == "mergekit" and method and method.mergekit_compute == "dtype":
        given = recipe.dtype if "dtype" in recipe.model_fields_set else None
        return getattr(torch, given) if given else stored
    return torch.float64 if recipe.dtype == "float64" else torch.float32


def plan_output(
    recipe: Recipe,
    method: MethodSpec,
    base: Checkpoint | Stacked | None,
    experts: list[Source],
    tensors: list[TensorPlan],
    shard_bytes: int,
) -> MergeOutput:
    """The output's layout: a LoRA adapter (``output_format: lora``), a task-mask artifact (mask
    methods) or a model folder."""
    metadata = {"mergecli_method": method.name}
    if recipe.output_format == "lora":
        merged = {t.name: t.params for t in tensors if t.merge}
        lora_dtype = getattr(torch, recipe.out_dtype or "float32")
        return LoraAdapter(
            plan_lora_output(recipe, method, base, experts, merged, lora_dtype), metadata
        )
    specs = [(t.name, t.shape, t.out_dtype) for t in tensors]
    shards = plan_shards(specs, shard_bytes)
    if method.output != "task_masks":
        return ModelFolder(shards, metadata)
    return TaskMaskArtifact(
        plan_task_artifact(
            specs,
            [(t.name, t.shape, t.out_dtype) for t in tensors if t.merge],
            [recipe.model_name(i) for i in range(len(recipe.models))],
            shard_bytes,
            files_bytes(shards, metadata),
            metadata,
        )
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
