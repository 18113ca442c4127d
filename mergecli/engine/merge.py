"""Run a planned merge: statistics passes, the merge pass, the output folder and the report."""

from __future__ import annotations

import resource
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.lora_output import lora_summary, write_adapter_config
from mergecli.engine.output import atomic_folder, check_output, copy_model_files
from mergecli.engine.plan import MergePlan, TensorPlan
from mergecli.engine.stream import Timer, stream_inputs
from mergecli.engine.task_artifact import StoredTaskTensor, TaskArtifactWriter
from mergecli.engine.writer import ShardWriter
from mergecli.errors import MergeError
from mergecli.methods import TaskMasks, TensorInputs
from mergecli.ops import dot64, sumsq64
from mergecli.progress import NullProgress, Progress
from mergecli.report import model_card, write_reports

WRITE_QUEUE = 2
"""Merged tensors waiting to be written, at most."""


@dataclass
class MergeResult:
    """What a merge wrote and measured."""

    output: Path
    report: dict[str, Any]


def gather_statistics(plan: MergePlan, timer: Timer, progress: Progress) -> dict[str, Any]:
    """Stream the merged tensors once per pass until every statistic is final."""
    merged = [t for t in plan.tensors if t.merge]
    passes = 0
    while any(s.wants_pass() for s in plan.statistics):
        passes += 1
        progress.start(f"statistics pass {passes}", len(merged), _read_bytes(plan, merged))
        active = [s for s in plan.statistics if s.wants_pass()]
        for tensor, inputs in stream_inputs(plan, merged, timer):
            assert isinstance(inputs, TensorInputs)
            for statistic in active:
                statistic.observe(inputs)
            progress.advance(1, _read_bytes(plan, [tensor]))
        for statistic in active:
            statistic.end_pass()
    return {s.key: s.value() for s in plan.statistics}


def _read_bytes(plan: MergePlan, tensors: list) -> int:
    return sum(src.info(t.name).nbytes for t in tensors for src in plan.read_sources(t))


def tensor_report(inputs: TensorInputs, merged: torch.Tensor | TaskMasks) -> dict[str, Any]:
    """Norms of the task vectors, their cosine with the merged delta (an artifact's unified
    task vector), kept and sign agreement."""
    if inputs.base is None:
        return {"kept": inputs.kept}
    tvs = inputs.task_vectors()
    delta = merged.unified if isinstance(merged, TaskMasks) else merged - inputs.base
    delta_sq = sumsq64(delta)
    norms, cosines, agreement = [], [], []
    for tv in tvs:
        tv_sq = sumsq64(tv)
        norms.append(tv_sq**0.5)
        denom = (tv_sq * delta_sq) ** 0.5
        cosines.append(dot64(tv, delta) / denom if denom > 0 else 0.0)
        both = (tv != 0) & (delta != 0)
        count = int(both.sum())
        same = int((both & (torch.sign(tv) == torch.sign(delta))).sum())
        agreement.append(same / count if count else None)
    kept = [
        k if k is not None else float((tv != 0).sum()) / max(tv.numel(), 1)
        for k, tv in zip(inputs.kept, tvs, strict=True)
    ]
    return {
        "task_vector_norm": norms,
        "delta_norm": delta_sq**0.5,
        "cosine_to_delta": cosines,
        "kept": kept,
        "sign_agreement": agreement,
        "numel": delta.numel(),
    }


def run_merge(
    plan: MergePlan,
    output: str | Path,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Execute a plan into ``output`` (atomically) and return the report."""
    progress = progress or NullProgress()
    output = Path(output).resolve()
    check_output(output, force)
    timer = Timer()
    started = time.perf_counter()
    stats = gather_statistics(plan, timer, progress)
    per_tensor: dict[str, Any] = {}
    with atomic_folder(output, force) as folder:
        writer: ShardWriter | TaskArtifactWriter = (
            TaskArtifactWriter(folder, plan.artifact, plan.method.name)
            if plan.artifact
            else ShardWriter(folder, plan.shards, {"mergecli_method": plan.method.name})
        )
        merge_stream(plan, writer, stats, timer, progress, per_tensor)
        writer.finish()
        if plan.lora is None:
            copy_model_files(plan.reference.path, tokenizer_folder(plan), folder, plan.out_dtype)
        else:
            write_adapter_config(folder, plan.lora)
        wall = time.perf_counter() - started
        report = build_report(plan, output, per_tensor, timer, writer.bytes_written, wall)
        if isinstance(writer, TaskArtifactWriter):
            report["artifact"] = writer.summary()
        if plan.lora is not None:
            report["lora"] = lora_summary(plan.lora, per_tensor)
        write_reports(folder, report)
        (folder / "README.md").write_text(model_card(plan))
    progress.stop()
    return MergeResult(output, report)


class MemoryWriter:
    """Keeps the merged tensors in a dict, on the plan's device (evaluation without a folder)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.state[name] = tensor
        self.bytes_written += tensor.nbytes


def merge_state(plan: MergePlan, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Run a plan into memory: the merged model's state dict (tensor name → tensor).

    Holds the whole merged model, which is what evaluating it needs anyway; task-mask artifact
    methods write folders only.
    """
    if plan.artifact is not None:
        raise MergeError(
            f"merge_method: '{plan.method.name}' writes a task-mask artifact, not one model: "
            "run it into a folder"
        )
    if plan.lora is not None:
        raise MergeError("this recipe writes a LoRA adapter; in-memory merges hold full weights")
    progress = progress or NullProgress()
    timer = Timer()
    stats = gather_statistics(plan, timer, progress)
    writer = MemoryWriter()
    merge_stream(plan, writer, stats, timer, progress, None)
    progress.stop()
    return writer.state


def merge_stream(
    plan: MergePlan,
    writer: ShardWriter | TaskArtifactWriter | MemoryWriter,
    stats: dict[str, Any],
    timer: Timer,
    progress: Progress,
    per_tensor: dict[str, Any] | None,
) -> None:
    """Merge every planned tensor in order and hand it to ``writer`` (on a writer thread);
    the per-tensor report figures go into ``per_tensor`` unless it is None."""
    progress.start("merging", len(plan.tensors), _read_bytes(plan, plan.tensors))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-write") as pool:
        pending: deque[Future[None]] = deque()
        for tensor, inputs in stream_inputs(plan, plan.tensors, timer):
            results: list[tuple[str, Any]] = []
            if isinstance(inputs, TensorInputs):
                start = time.perf_counter()
                merged = merge_tensor(plan, tensor, inputs, stats)
                report = tensor_report(inputs, merged) if per_tensor is not None else {}
                if plan.lora is None:
                    results.append((tensor.name, stored(tensor, inputs, merged)))
                else:
                    assert isinstance(merged, torch.Tensor)
                    pieces, energy = plan.lora.outputs(tensor.name, inputs, merged, tensor.params)
                    results += pieces
                    if energy is not None:
                        report["energy_kept"] = energy
                if per_tensor is not None:
                    per_tensor[tensor.name] = report
                timer.compute += time.perf_counter() - start
            elif plan.lora is None:
                results.append((tensor.name, inputs))
            for name, result in results:
                pending.append(pool.submit(_write, writer, name, result, timer))
            while len(pending) > WRITE_QUEUE:
                pending.popleft().result()
            progress.advance(1, _read_bytes(plan, [tensor]))
        for future in pending:
            future.result()


def tokenizer_folder(plan: MergePlan) -> Path:
    """The recipe's ``tokenizer_source``, or the reference model's folder."""
    source = plan.recipe.tokenizer_source
    if source and source != "base":
        return plan.recipe.resolve_path(source)
    return plan.reference.path


def merge_tensor(
    plan: MergePlan, tensor: TensorPlan, inputs: TensorInputs, stats: dict[str, Any]
) -> torch.Tensor | TaskMasks:
    """The method's result for one tensor; an unexpected failure names the tensor."""
    inputs.stats = stats
    try:
        return plan.method.fn(inputs, tensor.params)
    except MergeError:
        raise
    except Exception as exc:
        raise MergeError(f"{plan.method.name} failed on '{tensor.name}': {exc}") from exc


def stored(
    tensor: TensorPlan, inputs: TensorInputs, merged: torch.Tensor | TaskMasks
) -> torch.Tensor | StoredTaskTensor:
    """What the writer stores: the merged tensor, or the artifact's parts, in the output dtype."""
    if isinstance(merged, TaskMasks):
        assert inputs.base is not None
        return StoredTaskTensor.of(inputs.base, merged, tensor.out_dtype)
    return merged.to(tensor.out_dtype)


def _write(
    writer: ShardWriter | TaskArtifactWriter | MemoryWriter,
    name: str,
    tensor: torch.Tensor | StoredTaskTensor,
    timer: Timer,
) -> None:
    start = time.perf_counter()
    writer.write(name, tensor)
    timer.write += time.perf_counter() - start


def build_report(
    plan: MergePlan,
    output: Path,
    per_tensor: dict[str, Any],
    timer: Timer,
    bytes_written: int,
    wall: float,
) -> dict[str, Any]:
    """The merge report: inputs, parameters, per-tensor figures, totals and timings."""
    inputs = ([("base", plan.base)] if plan.base else []) + list(
        zip(plan.expert_names, plan.experts, strict=True)
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    totals = summarize(per_tensor, len(plan.experts))
    return {
        "mergecli_report": 1,
        "output": str(output),
        "recipe": plan.recipe.model_dump(mode="json", exclude={"folder"}),
        "method": plan.method.name,
        "inputs": [
            {
                "role": role,
                "path": str(src.path),
                "bytes": src.nbytes,
                "fingerprint": src.fingerprint(),
            }
            for role, src in inputs
        ],
        "plan": plan.summary(),
        "totals": totals,
        "tensors": per_tensor,
        "timing": {
            "wall_s": wall,
            "read_s": timer.read,
            "compute_s": timer.compute,
            "write_s": timer.write,
        },
        "bytes_read": timer.bytes_read,
        "bytes_written": bytes_written,
        "throughput_bytes_per_s": timer.bytes_read / wall if wall > 0 else None,
        "peak_rss_bytes": peak,
        "device": str(plan.device),
    }


def summarize(per_tensor: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """Whole-model figures from the per-tensor ones, weighted by tensor size."""
    rows = [r for r in per_tensor.values() if "numel" in r]
    if not rows:
        return {"merged_tensors": len(per_tensor)}
    numel = sum(r["numel"] for r in rows)

    def weighted(key: str, t: int) -> float | None:
        vals = [(r[key][t], r["numel"]) for r in rows if r[key][t] is not None]
        return sum(v * n for v, n in vals) / sum(n for _, n in vals) if vals else None

    norms = [sum(r["task_vector_norm"][t] ** 2 for r in rows) ** 0.5 for t in range(num_experts)]
    delta_norm = sum(r["delta_norm"] ** 2 for r in rows) ** 0.5
    dots = [
        sum(r["cosine_to_delta"][t] * r["task_vector_norm"][t] * r["delta_norm"] for r in rows)
        for t in range(num_experts)
    ]
    return {
        "merged_tensors": len(per_tensor),
        "merged_parameters": numel,
        "task_vector_norm": norms,
        "delta_norm": delta_norm,
        "cosine_to_delta": [
            d / (n * delta_norm) if n * delta_norm > 0 else 0.0
            for d, n in zip(dots, norms, strict=True)
        ],
        "kept": [weighted("kept", t) for t in range(num_experts)],
        "sign_agreement": [weighted("sign_agreement", t) for t in range(num_experts)],
    }
