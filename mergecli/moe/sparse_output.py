"""The sparse MoE output on the runner: a transformers model folder (config, sharded
safetensors, tokenizer) plus ``moe.json``.

The tensors outside the experts come from the base, or from a merge written aside first; one
stream copies every ``Copy`` entry (experts' MLPs, attention, norms, embeddings) into the
shards, and the writer puts each layer's router rows (computed before the stream) in their place.
With training, that model is written aside (``.untrained``), trained in memory, and a second
stream writes the trained weights (a ``StateDict`` source) through the same writer into the
planned shards.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.outputs import CopyWriter, Target, Written
from mergecli.engine.read_plan import ReadPlan, TensorPlan
from mergecli.engine.runner import Runner
from mergecli.engine.store import Store
from mergecli.engine.writer import ShardWriter
from mergecli.moe.gates import gate_rows
from mergecli.moe.load import MANIFEST
from mergecli.moe.plan import MoePlan
from mergecli.moe.report import gate_report
from mergecli.moe.sparse import BASE, Copy, Router
from mergecli.progress import Progress
from mergecli.sources.checkpoint import CONFIG_FILES, TOKENIZER_FILES, Checkpoint
from mergecli.sources.readable import Readable
from mergecli.sources.renamed import Renamed
from mergecli.sources.state import StateDict

SHARED = ".shared"
"""Sub-folder of the merged tensors outside the experts, read by the copy stream."""
UNTRAINED = ".untrained"
"""Sub-folder of the untrained model, which training loads."""


def write_sparse(plan: MoePlan, folder: Path, runner: Runner) -> dict[str, Any]:
    """The shared tensors' merge (when asked), the routers, the shards, config, tokenizer,
    training (when asked) and manifest; the report's entries."""
    base = plan.base
    merged: dict[str, Any] | None = None
    if plan.merge is not None:  # the tensors outside the experts: merged, written aside first
        from mergecli.engine.merge import run_merge

        result = run_merge(plan.merge, folder / SHARED, progress=runner.progress)
        merged = {k: result.report[k] for k in ("method", "totals") if k in result.report}
        base = Checkpoint(folder / SHARED, "merged shared tensors")
    gates = _gates(plan, runner.progress)
    names: dict[str, tuple[Readable, str]] = {
        e.out: (base if e.source == BASE else plan.source(e.source), e.name)
        for e in plan.entries
        if isinstance(e, Copy)
    }
    tensors = [
        TensorPlan(out, source.info(name).shape, plan.out_dtype, merge=False)
        for out, (source, name) in names.items()
    ]
    read = ReadPlan.copies(
        tensors, Renamed("MoE inputs", names), plan.recipe.on_nonfinite, plan.warnings
    )
    untrained = folder / UNTRAINED if plan.section.train_steps else folder
    untrained.mkdir(exist_ok=True)
    writer = SparseMoe(plan, gates).open(untrained, plan.target())
    runner.run(read, [Store(writer, runner.timer)], "write experts")
    writer.finish({})
    bytes_read = runner.timer.bytes_read  # from the inputs (not the trained weights in memory)
    bytes_written = writer.bytes_written
    shutil.rmtree(folder / SHARED, ignore_errors=True)
    training = None
    if plan.section.train_steps:
        training, state = _train(plan, untrained, runner.progress)
        bytes_written = write_trained(plan, folder, state, runner)
        shutil.rmtree(untrained)
    experts = len(plan.experts)
    manifest = {
        "format": "mergecli-moe",
        "version": 1,
        "kind": "sparse",
        "base_model": plan.base.origin or str(plan.base.path),
        "architecture": plan.config.architectures[0],
        "experts": plan.names,
        "top_k": plan.section.top_k,
        "gate_mode": plan.section.gate_mode,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report: dict[str, Any] = {
        "manifest": manifest,
        "gates": gate_report(gates[:, :experts]),
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
    }
    if merged:
        report["shared_merge"] = merged
    if training:
        report["training"] = training
    bad = [r["layer"] for r in report["gates"] if r["condition_number"] > 5]
    if bad and plan.section.gate_mode != "random":
        report["warnings"] = [
            f"layers {bad}: router rows are nearly dependent (condition number > 5); the "
            "prompts may be too similar and some experts underused"
        ]
    return report


@dataclass
class SparseMoe:
    """The sparse MoE model's output: the planned shards, each layer's router rows (computed
    before the stream; None when the stream reads them, as for trained weights)."""

    plan: MoePlan
    gates: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.plan.shards)

    def open(self, folder: Path, target: Target) -> SparseWriter:
        shards = ShardWriter(folder, self.plan.shards)
        return SparseWriter(shards, folder, target, self.plan, self.gates)


class SparseWriter(CopyWriter):
    """The MoE model's shards: each copied tensor in the output dtype, each layer's router rows
    (computed, not read) before the layer's experts; then config and tokenizer files."""

    def __init__(
        self,
        shards: ShardWriter,
        folder: Path,
        target: Target,
        plan: MoePlan,
        gates: torch.Tensor | None,
    ) -> None:
        super().__init__(shards, folder, target)
        self.plan = plan
        self.gates = gates
        self.entries = deque(plan.entries)

    def copied(self, tensor: TensorPlan, value: torch.Tensor) -> Written:
        if self.gates is None:  # trained weights: the routers are read like every tensor
            return super().copied(tensor, value)
        written: Written = []
        entry = self.entries.popleft()
        while isinstance(entry, Router):
            written.append((entry.out, self.router(entry)))
            entry = self.entries.popleft()
        assert entry.out == tensor.name, (entry, tensor.name)
        return [*written, *super().copied(tensor, value)]

    def router(self, router: Router) -> torch.Tensor:
        assert self.gates is not None
        experts = len(self.plan.experts)
        rows = self.gates[router.layer]
        return (rows[experts:] if router.shared else rows[:experts]).to(self.plan.out_dtype)

    def finish(self, per_tensor: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The shards, the MoE config, the base's generation config and the tokenizer."""
        self.shards.finish()
        self.plan.config.save_pretrained(self.folder)
        target = self.target
        assert target.model_files is not None and target.tokenizer is not None
        sources = ((target.model_files, CONFIG_FILES[1:]), (target.tokenizer, TOKENIZER_FILES))
        for origin, names in sources:
            for name in names:
                if (origin / name).is_file():
                    shutil.copyfile(origin / name, self.folder / name)
        return {}, []


def _gates(plan: MoePlan, progress: Progress) -> torch.Tensor:
    config = plan.config
    rows = len(plan.experts) + (plan.shared is not None)
    progress.start(f"{plan.section.gate_mode} gates", config.num_hidden_layers, 0)
    gates = gate_rows(
        plan.section.gate_mode,
        plan.base,
        plan.prompts,
        config.num_hidden_layers,
        config.hidden_size,
        rows,
        plan.recipe.seed,
    )
    progress.advance(config.num_hidden_layers, 0)
    return gates


def _train(
    plan: MoePlan, folder: Path, progress: Progress
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train routers and experts of the model in ``folder``; the training report and the
    trained weights (float32, CPU)."""
    from mergecli.moe.train import train

    s = plan.section
    return train(
        folder,
        plan.train_files,
        s.train_steps,
        s.lr,
        s.batch_size,
        plan.recipe.seed,
        plan.device,
        progress,
    )


def write_trained(
    plan: MoePlan, folder: Path, state: dict[str, torch.Tensor], runner: Runner
) -> int:
    """The trained weights streamed into the planned shards (in the output dtype, routers
    included, as read), config and tokenizer files; the bytes written."""
    tensors = [
        TensorPlan(name, shard.shapes[i], plan.out_dtype, merge=False)
        for shard in plan.shards
        for i, name in enumerate(shard.names)
    ]
    read = ReadPlan.copies(
        tensors, StateDict("trained MoE", state), plan.recipe.on_nonfinite, plan.warnings
    )
    writer = SparseMoe(plan, None).open(folder, plan.target())
    runner.run(read, [Store(writer, runner.timer)], "write trained weights")
    writer.finish({})
    return writer.bytes_written
