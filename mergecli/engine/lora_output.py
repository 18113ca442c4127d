"""``output_format: lora``: the merged model written as a PEFT LoRA adapter over the base.

Each changed weight of a linear or embedding layer becomes a LoRA pair of scale 1 (lora_alpha
= r per module through ``alpha_pattern``, r through ``rank_pattern``). When the method merges
task vectors linearly (Σ ct τt) and every expert's change of that weight is one LoRA product
sB A, the pair is exact: B = [c1 s1 B1 | c2 s2 B2 | ...], A = [A1; A2; ...]. Otherwise the
merged delta is truncated by SVD to ``rank``, keeping the fraction Σi≤k σi² / Σ σi² of its
energy. Other changed tensors (norms, biases, layers of other types, and layers an expert
adapter saves whole) are saved whole through ``modules_to_save``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.layout import Shard
from mergecli.engine.outputs import Card, Sharded, Target, Written
from mergecli.engine.read_plan import TensorPlan
from mergecli.engine.writer import ShardWriter
from mergecli.errors import RecipeError, SourceError
from mergecli.methods import MethodSpec, Params, TaskMasks, TensorInputs
from mergecli.recipe import Recipe
from mergecli.sources import Adapter, Checkpoint, Source
from mergecli.sources.adapter import ADAPTER_CONFIG, PEFT_PREFIX
from mergecli.sources.stacked import Stacked

WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraPair:
    """How one merged weight becomes a LoRA pair."""

    module: str
    rank: int
    embedding: bool
    exact: bool

    def names(self) -> tuple[str, str]:
        if self.embedding:
            return (
                f"{PEFT_PREFIX}{self.module}.lora_embedding_A",
                f"{PEFT_PREFIX}{self.module}.lora_embedding_B",
            )
        return (
            f"{PEFT_PREFIX}{self.module}.lora_A.weight",
            f"{PEFT_PREFIX}{self.module}.lora_B.weight",
        )


@dataclass
class LoraLayout:
    """The adapter's tensors, decided from headers while planning."""

    base: str
    pairs: dict[str, LoraPair]
    """LoRA pairs by the base tensor they change."""
    saved: dict[str, str]
    """Tensors saved whole, by base tensor name → module name (``modules_to_save``)."""
    coefficients: Callable[[Params], list[float] | None] | None
    """The method's ``coefficients`` (Σ ct τt), used for the exact pairs."""
    dtype: torch.dtype
    experts: list[Adapter]
    """The experts, when every one is an adapter (exact pairs need their factors)."""
    shard: Shard = field(default_factory=lambda: Shard(WEIGHTS_FILE))

    def config(self) -> dict[str, Any]:
        """adapter_config.json: per-module rank r and alpha r, so every scale is 1."""
        pattern = {re.escape(p.module): p.rank for p in self.pairs.values()}
        rank = max(pattern.values(), default=1)
        saved = sorted(set(self.saved.values()))
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.base,
            "r": rank,
            "lora_alpha": rank,
            "target_modules": sorted(p.module for p in self.pairs.values()),
            "rank_pattern": pattern,
            "alpha_pattern": pattern,
            "modules_to_save": saved or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
            "task_type": None,
        }

    def outputs(
        self, name: str, inputs: TensorInputs, merged: torch.Tensor, params: Params
    ) -> tuple[list[tuple[str, torch.Tensor]], float | None]:
        """The adapter tensors for one merged base tensor (none when it is not changed), and
        the fraction of the merged delta's energy its LoRA pair keeps (None when saved whole)."""
        if name in self.saved:
            return [(PEFT_PREFIX + name, merged.to(self.dtype))], None
        pair = self.pairs.get(name)
        if pair is None:
            return [], None
        assert inputs.base is not None
        if pair.exact:
            b, a, energy = *self._concatenated(name, params), 1.0
        else:
            b, a, energy = truncated(merged - inputs.base, pair)
        names = pair.names()
        return [(names[0], a.to(self.dtype)), (names[1], b.to(self.dtype))], energy

    def _concatenated(self, name: str, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """B = [ct st Bt], A = [At] over the experts whose change of ``name`` is one product."""
        assert self.coefficients is not None
        coefficients = self.coefficients(params)
        assert coefficients is not None
        bs, as_ = [], []
        for c, adapter in zip(coefficients, self.experts, strict=True):
            term = adapter.low_rank(name)
            if term is None:
                continue  # this expert leaves the tensor unchanged
            b, a = adapter.factors(term)
            bs.append(b * c)
            as_.append(a)
        return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def truncated(delta: torch.Tensor, pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy kept) of the rank-r truncated SVD of a delta (of its transpose for an
    embedding), computed in float64."""
    matrix = (delta.T if pair.embedding else delta).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = pair.rank
    total = float(s.square().sum())
    energy = float(s[:k].square().sum()) / total if total > 0 else 1.0
    return u[:, :k] * s[:k], vh[:k], energy


def module_kinds(config: dict[str, Any] | None, where: str) -> dict[str, str]:
    """'linear', 'embedding' or 'other' for every module of the base's architecture (its
    ``architectures``, else the causal LM of its ``model_type``), from a model built on the
    meta device out of its config.json (transformers classes only)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = config or {}
    arch = (config.get("architectures") or [None])[0]
    arch = arch or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SourceError(
            f"output_format: lora needs the base's architecture; {where}/config.json names "
            f"{arch or 'none'}, which transformers does not have",
            path=f"{where}/config.json",
        )
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config))
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        else:
            kinds[name] = "other"
    return kinds


def changes(name: str, experts: list[Source]) -> bool:
    """Whether the merge can change a tensor: some expert is a full model or targets it."""
    return any(not isinstance(e, Adapter) or name in e.terms for e in experts)


def plan_lora_output(
    recipe: Recipe,
    method: MethodSpec,
    base: Checkpoint | Stacked | None,
    experts: list[Source],
    merged: dict[str, Params],
    dtype: torch.dtype,
) -> LoraLayout:
    """Decide every LoRA pair and saved tensor of the output adapter from headers."""
    if base is None:
        raise RecipeError(
            "output_format: lora writes an adapter over a base; set base_model", key="base_model"
        )
    if method.output != "model":
        raise RecipeError(
            f"output_format: lora: '{method.name}' writes an artifact, not a model",
            key="output_format",
        )
    kinds = module_kinds(base.config(), str(base.path))
    changed = [n for n in merged if changes(n, experts)]
    modules: dict[str, list[str]] = {}
    for name in changed:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    adapters = [e for e in experts if isinstance(e, Adapter)]
    if len(adapters) < len(experts):
        adapters = []
    layout = LoraLayout(base.origin or str(base.path), {}, {}, method.coefficients, dtype, adapters)
    for module, names in modules.items():
        kind = kinds.get(module, "other")
        weight = f"{module}.weight"
        if kind == "other" or names != [weight] or any(a.saves(weight) for a in adapters):
            for name in names:
                layout.saved[name] = module
            continue
        shape = base.info(weight).shape
        linear = method.coefficients and method.coefficients(merged[weight]) is not None
        terms = [a.low_rank(weight) for a in adapters]
        exact = bool(linear and adapters) and all(
            (t is not None and t.transpose == (kind == "embedding")) or weight not in a.terms
            for t, a in zip(terms, adapters, strict=True)
        )
        if exact:
            rank = sum(a.rank(t) for t, a in zip(terms, adapters, strict=True) if t is not None)
        elif recipe.rank is None:
            raise RecipeError(
                f"rank: output_format lora needs a rank: '{method.name}' with these experts "
                f"merges {weight} into a delta that is truncated by SVD",
                key="rank",
            )
        else:
            rank = min(recipe.rank, *shape)
        layout.pairs[weight] = LoraPair(module, rank, kind == "embedding", exact)
    for name in merged:
        if name in layout.saved:
            layout.shard.names.append(PEFT_PREFIX + name)
            layout.shard.shapes.append(base.info(name).shape)
            layout.shard.dtypes.append(dtype)
        elif name in layout.pairs:
            pair = layout.pairs[name]
            rows, cols = base.info(name).shape
            out, inp = (cols, rows) if pair.embedding else (rows, cols)
            layout.shard.names.extend(pair.names())
            layout.shard.shapes.extend([(pair.rank, inp), (out, pair.rank)])
            layout.shard.dtypes.extend([dtype, dtype])
    return layout


@dataclass
class LoraAdapter:
    """The output plug-in of ``output_format: lora``: one adapter file and its config."""

    layout: LoraLayout
    metadata: dict[str, str]
    merged_rows = False
    copied_rows = True
    reads_base = True
    stores_result = False

    @property
    def nbytes(self) -> int:
        return self.layout.shard.nbytes

    def summary(self) -> dict[str, Any]:
        return {"shards": 1}

    def memory_error(self) -> str | None:
        return "this recipe writes a LoRA adapter; in-memory merges hold full weights"

    card = Card(
        "Merged LoRA adapter",
        "This LoRA adapter holds the merged model's change of the base "
        "(`PeftModel.from_pretrained(base, FOLDER)` loads it). It was merged",
        "peft",
    )

    def open(self, folder: Path, target: Target) -> LoraWriter:
        return LoraWriter(
            self.layout, ShardWriter(folder, [self.layout.shard], self.metadata), folder
        )


class LoraWriter(Sharded):
    """Writes each merged weight's LoRA pair (or the tensor whole); copied tensors are the
    base's and are not written."""

    def __init__(self, layout: LoraLayout, shards: ShardWriter, folder: Path) -> None:
        super().__init__(shards, folder)
        self.layout = layout

    def merged(
        self, tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
    ) -> tuple[Written, dict[str, Any]]:
        assert isinstance(merged, torch.Tensor)
        written, energy = self.layout.outputs(tensor.name, inputs, merged, tensor.params)
        return written, {} if energy is None else {"energy_kept": energy}

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        return []

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        self.shards.finish()
        write_adapter_config(self.folder, self.layout)
        section = lora_summary(self.layout, per_tensor)
        return {"lora": section}, markdown(section)


def markdown(lora: dict[str, Any]) -> list[str]:
    """The report's Markdown section of an adapter."""
    from mergecli.report import fmt

    return [
        "## LoRA adapter",
        "",
        f"Saved whole (modules_to_save): {', '.join(lora['modules_to_save']) or 'none'}. "
        f"Lowest fraction of a merged delta's energy kept: {fmt(lora['min_energy_kept'])}.",
        "",
        "| module | rank | exact | energy kept |",
        "|---|---|---|---|",
        *(
            f"| {name} | {m['rank']} | {'yes' if m['exact'] else 'no'} | {fmt(m['energy_kept'])} |"
            for name, m in lora["modules"].items()
        ),
        "",
    ]


def write_adapter_config(folder: Path, layout: LoraLayout) -> None:
    text = json.dumps(layout.config(), indent=2, sort_keys=True) + "\n"
    (folder / ADAPTER_CONFIG).write_text(text)


def lora_summary(layout: LoraLayout, per_tensor: dict[str, Any]) -> dict[str, Any]:
    """The report's section: every module's rank, exactness and energy kept (from the
    per-tensor reports)."""
    energy = {n: per_tensor[n]["energy_kept"] for n in layout.pairs if n in per_tensor}
    return {
        "modules": {
            p.module: {"rank": p.rank, "exact": p.exact, "energy_kept": energy.get(name)}
            for name, p in layout.pairs.items()
        },
        "modules_to_save": sorted(set(layout.saved.values())),
        "min_energy_kept": min(energy.values(), default=1.0),
    }
