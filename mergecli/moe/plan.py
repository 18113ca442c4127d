"""Plan an MoE upcycling from headers alone: Arrow from LoRA experts, or a sparse MoE model from
full fine-tunes; every validation error comes before a tensor is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.layout import Shard, files_bytes, parse_size, plan_shards
from mergecli.engine.outputs import Target
from mergecli.errors import RecipeError, ShapeError, SourceError, did_you_mean
from mergecli.moe.arrow import ArrowAdapter, check_compatible, check_top_k, open_arrow_adapter
from mergecli.moe.gates import load_tokenizer
from mergecli.moe.sparse import BASE, SHARED, Copy, Entry, architecture, moe_config, tensor_map
from mergecli.moe.train import train_files
from mergecli.recipe import MoePrompts, MoeSection, Recipe
from mergecli.sources.checkpoint import Checkpoint
from mergecli.sources.resolve import adapters_base, is_adapter, locate, open_base

ARROW_ONLY = ("router_temperature", "general")
SPARSE_ONLY = ("gate_mode", "architecture", "shared_expert", "prompts", "train_data")
SHARED_PROMPTS = "shared_expert"
"""The ``moe.prompts`` key of the qwen2_moe shared expert's gate prompts."""


@dataclass
class MoePlan:
    """Everything decided before the first tensor is read."""

    recipe: Recipe
    section: MoeSection
    kind: str
    """``arrow`` (LoRA experts) or ``sparse`` (full fine-tunes)."""
    base: Checkpoint
    names: list[str]
    warnings: list[str] = field(default_factory=list)
    # arrow
    adapters: list[ArrowAdapter] = field(default_factory=list)
    general: list[ArrowAdapter] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    # sparse
    arch: str | None = None
    experts: list[Checkpoint] = field(default_factory=list)
    shared: Checkpoint | None = None
    merge: Any = None
    """The MergePlan of the tensors outside the experts, when the recipe names merge_method."""
    entries: list[Entry] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    config: Any = None
    out_dtype: torch.dtype = torch.float32
    prompts: list[MoePrompts] | None = None
    train_files: dict[str, Path] = field(default_factory=dict)
    device: str = "cpu"

    def arrow_config(self) -> dict[str, Any]:
        """peft ArrowConfig's arguments."""
        return {
            "top_k": self.section.top_k,
            "router_temperature": self.section.router_temperature,
            "use_gks": bool(self.general),
            "rng_seed": self.recipe.seed,
        }

    def source(self, index: int) -> Checkpoint:
        if index == BASE:
            return self.base
        if index == SHARED:
            assert self.shared is not None
            return self.shared
        return self.experts[index]

    def target(self) -> Target:
        """Where the output's model files come from: config and generation config from the
        base, tokenizer from ``tokenizer_source`` (else the base)."""
        tokenizer = self.base.path
        source = self.recipe.tokenizer_source
        if source and source != "base":
            tokenizer = self.recipe.resolve_path(source)
        return Target(self.out_dtype, self.base.path, tokenizer)

    @property
    def bytes_to_write(self) -> int:
        if self.kind == "arrow":
            return sum(a.weights.nbytes for a in [*self.adapters, *self.general])
        return files_bytes(self.shards)

    @property
    def bytes_on_disk(self) -> int:
        """The most the run holds on disk at once: the output, plus the merged tensors outside
        the experts (written aside first) and, when training, the untrained model beside the
        trained one."""
        aside = self.merge.bytes_to_write if self.merge is not None else 0
        return self.bytes_to_write * (2 if self.section.train_steps else 1) + aside

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "base": str(self.base.path),
            "experts": dict(zip(self.names, self.paths(), strict=True)),
            "top_k": self.section.top_k,
        }
        if self.kind == "arrow":
            out |= {
                "general": [str(g.path) for g in self.general],
                "arrow_config": self.arrow_config(),
                "rank": self.adapters[0].rank,
                "routed_modules": len(self.modules),
            }
        else:
            out |= {
                "architecture": self.arch,
                "gate_mode": self.section.gate_mode,
                "shared_tensors": self.recipe.merge_method or "base",
                "shared_expert": str(self.shared.path) if self.shared else None,
                "tensors": len(self.entries),
                "shards": len(self.shards),
                "out_dtype": str(self.out_dtype).removeprefix("torch."),
                "train_steps": self.section.train_steps,
            }
        return out | {"bytes_to_write": self.bytes_to_write, "warnings": self.warnings}

    def paths(self) -> list[str]:
        if self.kind == "arrow":
            return [str(a.path) for a in self.adapters]
        return [str(e.path) for e in self.experts]


def plan_moe(recipe: Recipe, shard_size: str | int = "5GB", device: str = "cpu") -> MoePlan:
    """Validate an MoE recipe from headers and decide the output (see ``mergecli.moe``)."""
    section = recipe.moe
    if section is None:
        raise RecipeError("the recipe has no 'moe:' section", "moe")
    if recipe.tokenizer is not None or recipe.tokenizer_source == "union":
        key = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
        raise RecipeError(
            f"{key}: an MoE keeps its base's vocabulary; a new one (union, tokenizer:) is not "
            "supported here",
            key,
        )
    folders = [
        locate(recipe, m.model, f"models[{i}].model", m.revision)
        for i, m in enumerate(recipe.models)
    ]
    names = [recipe.model_name(i) for i in range(len(recipe.models))]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate:
        raise RecipeError(f"models: two experts are named '{duplicate}'; set 'name'", "models")
    for i, name in enumerate(names):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            key = f"models[{i}].name"
            raise RecipeError(f"{key}: '{name}' cannot name a folder of the output", key)
    kinds = {is_adapter(f) for f in folders}
    if len(kinds) > 1:
        raise RecipeError(
            "models: mix LoRA adapters and full checkpoints; an MoE takes one kind", "models"
        )
    check_top_k(section.top_k, len(folders))
    if kinds == {True}:
        return _plan_arrow(recipe, section, folders, names)
    return _plan_sparse(recipe, section, folders, names, shard_size, device)


def _refuse(section: MoeSection, keys: tuple[str, ...], kind: str) -> None:
    for key in keys:
        if key in section.model_fields_set:
            raise RecipeError(f"moe.{key}: not used by {kind}", f"moe.{key}")


def _plan_arrow(
    recipe: Recipe, section: MoeSection, folders: list[Path], names: list[str]
) -> MoePlan:
    _refuse(section, SPARSE_ONLY, "an Arrow MoE of LoRA experts")
    if section.train_steps:
        raise RecipeError(
            "moe.train_steps: peft's Arrow router has no trainable weights (its prototypes are "
            "recomputed from the experts when loaded); training is for sparse MoE outputs",
            "moe.train_steps",
        )
    if recipe.merge_method is not None:
        raise RecipeError(
            "merge_method: an Arrow MoE keeps every LoRA expert; leave merge_method out",
            "merge_method",
        )
    if recipe.base_model:
        base = open_base(recipe, recipe.base_model, "base_model")
    else:
        named = adapters_base(recipe, folders)
        assert named is not None
        base = open_base(recipe, named[0], f"base_model (from {named[2]}'s adapter_config)")
    adapters = [
        open_arrow_adapter(f, n, f"models[{i}].model")
        for i, (f, n) in enumerate(zip(folders, names, strict=True))
    ]
    general = []
    for i, value in enumerate(section.general):
        label = f"moe.general[{i}]"
        folder = locate(recipe, value, label)
        if not is_adapter(folder):
            raise SourceError(f"{label}: '{folder}' is not a PEFT adapter", folder)
        general.append(open_arrow_adapter(folder, folder.name, label))
    gnames = [g.name for g in general]
    duplicate = next((n for i, n in enumerate(gnames) if n in gnames[:i]), None)
    if duplicate:
        raise RecipeError(f"moe.general: two adapters in folders named '{duplicate}'")
    modules = check_compatible([*adapters, *general], base, section.top_k)
    return MoePlan(
        recipe, section, "arrow", base, names, adapters=adapters, general=general, modules=modules
    )


def _plan_sparse(
    recipe: Recipe,
    section: MoeSection,
    folders: list[Path],
    names: list[str],
    shard_size: str | int,
    device: str,
) -> MoePlan:
    _refuse(section, ARROW_ONLY, "a sparse MoE of full fine-tunes")
    if not recipe.base_model:
        raise RecipeError(
            "base_model: a sparse MoE takes attention and norms from a base", "base_model"
        )
    base = open_base(recipe, recipe.base_model, "base_model")
    config = base.config()
    if config is None:
        raise SourceError(f"base_model: no config.json in '{base.path}'", base.path)
    arch = architecture(str(config.get("model_type")), section.architecture)
    experts = [
        open_base(recipe, m.model, f"models[{i}].model", m.revision)
        for i, m in enumerate(recipe.models)
    ]
    shared = None
    if arch == "qwen2_moe":
        value = section.shared_expert or recipe.base_model
        shared = open_base(recipe, value, "moe.shared_expert")
    elif section.shared_expert:
        raise RecipeError(
            f"moe.shared_expert: {arch} has no shared expert in transformers", "moe.shared_expert"
        )
    entries = tensor_map(arch, base.tensor_names(), len(experts))
    embed = base.info("model.embed_tokens.weight") if "model.embed_tokens.weight" in base else None
    out_dtype = (
        getattr(torch, recipe.out_dtype)
        if recipe.out_dtype
        else (embed.dtype if embed else torch.float32)
    )
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    hidden = int(config["hidden_size"])
    for entry in entries:
        if isinstance(entry, Copy):
            source = (
                shared
                if entry.source == SHARED
                else (base if entry.source == BASE else experts[entry.source])
            )
            assert source is not None
            want = base.info(entry.name).shape
            if entry.name not in source:
                raise ShapeError(f"{source.label}: has no tensor '{entry.name}'", entry.name)
            if source.info(entry.name).shape != want:
                raise ShapeError(
                    f"{source.label}: '{entry.name}' has shape "
                    f"{list(source.info(entry.name).shape)}, the base {list(want)}",
                    entry.name,
                )
            tensors.append((entry.out, want, out_dtype))
        else:
            tensors.append((entry.out, (1 if entry.shared else len(experts), hidden), out_dtype))
    prompts = _prompts(section, names, arch)
    if prompts is not None:
        load_tokenizer(base.path)  # the gates need it: fail now, not after the merge
    merge = None
    if recipe.merge_method is not None:
        from mergecli.engine.plan import plan_merge

        merge = plan_merge(recipe, device=device, shard_size=shard_size)
    intermediate = shared.config() if shared else None
    dtype = str(out_dtype).removeprefix("torch.")
    moe = moe_config(
        arch,
        config,
        len(experts),
        section.top_k,
        dtype,
        int(intermediate["intermediate_size"]) if intermediate else None,
    )
    shards = plan_shards(tensors, parse_size(shard_size))
    files = train_files(recipe, names) if section.train_steps else {}
    return MoePlan(
        recipe,
        section,
        "sparse",
        base,
        names,
        arch=arch,
        experts=experts,
        shared=shared,
        merge=merge,
        entries=entries,
        shards=shards,
        config=moe,
        out_dtype=out_dtype,
        prompts=prompts,
        train_files=files,
        device=device,
    )


def _prompts(section: MoeSection, names: list[str], arch: str) -> list[MoePrompts] | None:
    """Each expert's prompts in model order (and the shared expert's last), or None (random)."""
    allowed = [*names, SHARED_PROMPTS] if arch == "qwen2_moe" else names
    for key in section.prompts:
        if key not in allowed:
            raise RecipeError(
                f"moe.prompts.{key}: no expert of that name{did_you_mean(key, allowed)}",
                f"moe.prompts.{key}",
            )
    if section.gate_mode == "random":
        if section.prompts:
            raise RecipeError("moe.prompts: gate_mode random uses no prompts", "moe.prompts")
        return None
    missing = [n for n in allowed if n not in section.prompts]
    if missing:
        raise RecipeError(
            f"moe.prompts.{missing[0]}: gate_mode {section.gate_mode} needs positive prompts "
            "for every expert",
            f"moe.prompts.{missing[0]}",
        )
    return [section.prompts[n] for n in allowed]
