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
from mergecli.engine.plan import MergePlan, Rows, TensorPlan
from mergecli.engine.report_sums import PieceFigures
from mergecli.engine.stream import Timer, stream_pieces
from mergecli.engine.task_artifact import StoredTaskTensor, TaskArtifactWriter
from mergecli.engine.threads import compute_threads
from mergecli.engine.writer import ShardWriter
from mergecli.errors import MergeError
from mergecli.methods import TaskMasks, TensorInputs
from mergecli.progress import NullProgress, Progress
from mergecli.report import model_card, write_reports

WRITE_QUEUE = 2
"""Merged pieces (tensors or row chunks) waiting to be written, at most."""


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
        for tensor, rows, inputs in stream_pieces(plan, merged, timer):
            assert isinstance(inputs, TensorInputs)
            for statistic in active:
                statistic.observe(inputs)
            progress.advance(*_piece_progress(plan, tensor, rows))
        for statistic in active:
            statistic.end_pass()
    return {s.key: s.value() for s in plan.statistics}


def _read_bytes(plan: MergePlan, tensors: list) -> int:
    return sum(src.info(t.name).nbytes for t in tensors for src in plan.read_sources(t))


def _piece_progress(plan: MergePlan, tensor: TensorPlan, rows: Rows) -> tuple[int, int]:
    """Tensors finished and bytes read by one piece, for the progress bar."""
    nbytes = _read_bytes(plan, [tensor])
    if rows is None:
        return 1, nbytes
    return int(rows[1] == tensor.shape[0]), nbytes * (rows[1] - rows[0]) // tensor.shape[0]


def tensor_report(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """Norms of the task vectors, their cosine with the merged delta, kept and sign agreement,
    from the ``piece_figures`` of a tensor's pieces."""
    kept = _kept(pieces)
    if "tv_sq" not in pieces[0]:
        return {"kept": kept}
    delta_sq = sum(p["delta_sq"] for p in pieces)
    experts = range(len(pieces[0]["tv_sq"]))
    tv_sq = [sum(p["tv_sq"][t] for p in pieces) for t in experts]
    dots = [sum(p["dot"][t] for p in pieces) for t in experts]
    counts = [sum(p["both"][t] for p in pieces) for t in experts]
    same = [sum(p["same"][t] for p in pieces) for t in experts]
    return {
        "task_vector_norm": [x**0.5 for x in tv_sq],
        "delta_norm": delta_sq**0.5,
        "cosine_to_delta": [
            d / (x * delta_sq) ** 0.5 if x * delta_sq > 0 else 0.0
            for d, x in zip(dots, tv_sq, strict=True)
        ],
        "kept": kept,
        "sign_agreement": [s / c if c else None for s, c in zip(same, counts, strict=True)],
        "numel": sum(p["size"] for p in pieces),
    }


def _kept(pieces: list[dict[str, Any]]) -> list[float | None]:
    """Kept fractions of the whole tensor: the pieces' fractions weighted by their sizes."""
    if len(pieces) == 1:
        return pieces[0]["kept"]
    sizes = [p["size"] for p in pieces]
    return [
        None
        if any(p["kept"][t] is None for p in pieces)
        else sum(p["kept"][t] * n for p, n in zip(pieces, sizes, strict=True)) / sum(sizes)
        for t in range(len(pieces[0]["kept"]))
    ]


def run_merge(
    plan: MergePlan,
    output: str | Path,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Execute a plan into ``output`` (atomically) and return the report."""
    with compute_threads():
        return _run_merge(plan, Path(output).resolve(), force, progress or NullProgress())


def _run_merge(plan: MergePlan, output: Path, force: bool, progress: Progress) -> MergeResult:
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
    """Merge every planned tensor in order (in row chunks where the plan allows, unless the
    writer keeps whole tensors in memory) and hand it to ``writer`` on a writer thread; the
    per-tensor report figures go into ``per_tensor`` unless it is None."""
    figures: dict[str, list[dict[str, Any]]] = {}
    extra: dict[str, dict[str, Any]] = {}
    piece_figures = PieceFigures()
    chunked = not isinstance(writer, MemoryWriter)
    progress.start("merging", len(plan.tensors), _read_bytes(plan, plan.tensors))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-write") as pool:
        pending: deque[Future[None]] = deque()
        for tensor, rows, inputs in stream_pieces(plan, plan.tensors, timer, chunked):
            results: list[tuple[str, Any]] = []
            if isinstance(inputs, TensorInputs):
                start = time.perf_counter()
                merged = merge_tensor(plan, tensor, inputs, stats)
                if per_tensor is not None:
                    # the report's sums run on the writer thread, beside the next merge
                    sums = figures.setdefault(tensor.name, [])
                    pending.append(pool.submit(_add_figures, piece_figures, sums, inputs, merged))
                if plan.lora is None:
                    results.append((tensor.name, stored(tensor, inputs, merged)))
                else:
                    assert isinstance(merged, torch.Tensor)
                    outputs, energy = plan.lora.outputs(tensor.name, inputs, merged, tensor.params)
                    results += outputs
                    if energy is not None:
                        extra[tensor.name] = {"energy_kept": energy}
                del merged
                timer.compute += time.perf_counter() - start
            elif plan.lora is None:
                results.append((tensor.name, inputs))
            del inputs  # the stream reads the next piece once this one is released
            for name, result in results:
                pending.append(pool.submit(_write, writer, name, result, timer))
            while len(pending) > WRITE_QUEUE:
                pending.popleft().result()
            progress.advance(*_piece_progress(plan, tensor, rows))
        for future in pending:
            future.result()
    if per_tensor is not None:
        per_tensor.update(
            {name: {**tensor_report(p), **extra.get(name, {})} for name, p in figures.items()}
        )


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


def _add_figures(
    piece_figures: PieceFigures,
    sums: list[dict[str, Any]],
    inputs: TensorInputs,
    merged: torch.Tensor | TaskMasks,
) -> None:
    sums.append(piece_figures(inputs, merged))


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
        "threads": torch.get_num_threads(),
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
