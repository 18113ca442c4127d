"""The Arrow output on the runner: one stream measures the prototypes (every adapter's factors
of one module at a time), a second copies the adapters into the folder in peft's layout.

Folder: ``experts/<name>/`` and ``general/<name>/`` (adapter config and weights), ``moe.json``
(the manifest ``mergecli.moe.load`` reads).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.layout import Shard
from mergecli.engine.outputs import Target, WholeModel
from mergecli.engine.read_plan import ReadPlan, TensorPlan, whole
from mergecli.engine.runner import Each, Runner
from mergecli.engine.store import Store
from mergecli.engine.writer import ShardWriter
from mergecli.methods import TensorInputs
from mergecli.moe.arrow import ArrowAdapter, ModuleStats, layer_summary, module_stats
from mergecli.moe.load import MANIFEST
from mergecli.moe.plan import MoePlan
from mergecli.sources.adapter import ADAPTER_CONFIG, PEFT_PREFIX
from mergecli.sources.readable import Readable
from mergecli.sources.renamed import Renamed

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FACTORS = ("lora_A", "lora_B")


def write_arrow(plan: MoePlan, folder: Path, runner: Runner) -> dict[str, Any]:
    """The prototypes, the adapters' copies and the manifest; the report's entries."""
    stats = prototypes(plan, runner)
    copies = [
        *((f"experts/{a.name}", a) for a in plan.adapters),
        *((f"general/{a.name}", a) for a in plan.general),
    ]
    writer = ArrowMoe(copies).open(folder, plan.target())
    runner.run(copy_reads(copies), [Store(writer, runner.timer)], "copy adapters")
    writer.finish({})
    manifest = {
        "format": "mergecli-moe",
        "version": 1,
        "kind": "arrow",
        "base_model": plan.base.origin or str(plan.base.path),
        "experts": [f"experts/{a.name}" for a in plan.adapters],
        "general": [f"general/{a.name}" for a in plan.general],
        "arrow_config": plan.arrow_config(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {
        "manifest": manifest,
        "layers": layer_summary(stats),
        "modules": [s.summary() for s in stats],
        "bytes_read": runner.timer.bytes_read,
        "bytes_written": writer.bytes_written,
    }


def prototypes(plan: MoePlan, runner: Runner) -> list[ModuleStats]:
    """Each routed module's prototypes and singular-value shares, streamed module by module:
    A then B of the module from every expert and general adapter, in float64."""
    adapters = [a.weights for a in (*plan.adapters, *plan.general)]
    names = [f"{PEFT_PREFIX}{m}.{f}.weight" for m in plan.modules for f in FACTORS]
    tensors = [TensorPlan(n, adapters[0].info(n).shape, torch.float64, merge=True) for n in names]
    read = ReadPlan(
        tensors,
        whole,
        None,
        list(adapters),
        adapters[0],
        torch.device("cpu"),
        torch.float64,
        on_nonfinite=plan.recipe.on_nonfinite,
        warnings=plan.warnings,
    )
    gather = ModuleFactors(len(plan.adapters))
    runner.run(read, [Each(gather)], "Arrow prototypes")
    return gather.stats


class ModuleFactors:
    """Holds a module's A factors until its B factors arrive, then measures the module."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.a: list[torch.Tensor] = []
        self.stats: list[ModuleStats] = []

    def __call__(self, tensor: TensorPlan, inputs: TensorInputs) -> None:
        factors = [w for w in inputs.expert_weights if w is not None]
        if tensor.name.endswith(".lora_A.weight"):
            self.a = factors
            return
        module = tensor.name.removeprefix(PEFT_PREFIX).removesuffix(".lora_B.weight")
        pairs = list(zip(self.a, factors, strict=True))
        self.stats.append(module_stats(module, pairs[: self.experts], pairs[self.experts :]))
        self.a = []


def copy_reads(copies: list[tuple[str, ArrowAdapter]]) -> ReadPlan:
    """Every tensor of every adapter, as ``<folder>/<tensor>``."""
    names: dict[str, tuple[Readable, str]] = {
        f"{sub}/{n}": (a.weights, n) for sub, a in copies for n in a.weights.tensor_names()
    }
    tensors = [
        TensorPlan(name, source.info(n).shape, source.info(n).dtype, merge=False)
        for name, (source, n) in names.items()
    ]
    return ReadPlan.copies(tensors, Renamed("Arrow adapters", names))


@dataclass
class ArrowMoe:
    """The Arrow folder's output: each adapter copied unchanged into its sub-folder."""

    copies: list[tuple[str, ArrowAdapter]]
    """(sub-folder, adapter) pairs."""

    @property
    def nbytes(self) -> int:
        return sum(a.weights.nbytes for _, a in self.copies)

    def open(self, folder: Path, target: Target) -> AdapterCopies:
        return AdapterCopies(folder, self.copies)


class AdapterCopies(WholeModel):
    """Writes adapters unchanged into sub-folders: config copied, weights streamed in."""

    def __init__(self, folder: Path, copies: list[tuple[str, ArrowAdapter]]) -> None:
        self.writers: list[ShardWriter] = []
        self.targets: dict[str, tuple[ShardWriter, str]] = {}
        for sub, adapter in copies:
            (folder / sub).mkdir(parents=True)
            shutil.copyfile(adapter.path / ADAPTER_CONFIG, folder / sub / ADAPTER_CONFIG)
            names = adapter.weights.tensor_names()
            infos = [adapter.weights.info(n) for n in names]
            shard = Shard(
                ADAPTER_WEIGHTS, names, [i.shape for i in infos], [i.dtype for i in infos]
            )
            writer = ShardWriter(folder / sub, [shard])
            self.writers.append(writer)
            self.targets |= {f"{sub}/{n}": (writer, n) for n in names}

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers)

    def write(self, name: str, value: Any) -> None:
        writer, stored = self.targets[name]
        writer.write(stored, value)

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        for writer in self.writers:
            writer.finish()
        return {}, []
