"""Stream the inputs of each planned tensor, reading ahead on a background thread."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergecli.engine.plan import LOOKAHEAD, READ_AHEAD_BYTES, MergePlan, Rows, TensorPlan
from mergecli.methods import TensorInputs


@dataclass
class Timer:
    """Seconds spent per stage (busy time; stages overlap, so they may add up to more than wall)."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    bytes_read: int = 0


def _read(plan: MergePlan, tensor: TensorPlan, rows: Rows, timer: Timer) -> list[torch.Tensor]:
    """Read one piece from each source into private memory: in the compute dtype when merged
    on the CPU (converted once, in place of a copy), page-locked as stored for a GPU."""
    start = time.perf_counter()
    cuda = plan.device.type == "cuda"
    out = []
    for source in plan.read_sources(tensor):
        t = source.read(tensor.name, rows)
        timer.bytes_read += t.nbytes
        if cuda:
            out.append(t.pin_memory())
        else:
            out.append(t.to(plan.compute_dtype) if tensor.merge else t)
    timer.read += time.perf_counter() - start
    return out


def stream_inputs(
    plan: MergePlan, tensors: list[TensorPlan], timer: Timer
) -> Iterator[tuple[TensorPlan, TensorInputs | torch.Tensor]]:
    """Yield each whole tensor's inputs in compute dtype on the plan's device, reading ahead.

    Merged tensors give TensorInputs; copied tensors give the reference's tensor as stored.
    """
    for tensor, _, inputs in stream_pieces(plan, tensors, timer, chunked=False):
        yield tensor, inputs


def stream_pieces(
    plan: MergePlan, tensors: list[TensorPlan], timer: Timer, chunked: bool = True
) -> Iterator[tuple[TensorPlan, Rows, TensorInputs | torch.Tensor]]:
    """Like ``stream_inputs``, but a tensor comes in the row chunks of ``plan.pieces`` (in
    order; each chunk knows its entry offset in the tensor) when ``chunked``."""
    pieces = [(t, rows) for t in tensors for rows in (plan.pieces(t) if chunked else [None])]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-read") as pool:
        pending: deque[tuple[TensorPlan, Rows, Future[list[torch.Tensor]], int]] = deque()
        waiting = deque(pieces)

        def read(ahead: bool) -> None:
            """Queue the next reads: those within LOOKAHEAD and READ_AHEAD_BYTES, or (when
            nothing is queued and the merge waits) the next one whatever its size."""
            while waiting:
                tensor, rows = waiting[0]
                size = plan.piece_bytes(tensor, rows)
                queued = sum(p[3] for p in pending)
                if ahead and (len(pending) > LOOKAHEAD or queued + size > READ_AHEAD_BYTES):
                    return
                waiting.popleft()
                pending.append((tensor, rows, pool.submit(_read, plan, tensor, rows, timer), size))
                if not ahead:
                    return

        while waiting or pending:
            if not pending:
                read(ahead=False)
            tensor, rows, future, _ = pending.popleft()
            raw = future.result()
            read(ahead=True)
            if not tensor.merge:
                yield tensor, rows, raw.pop()
                continue
            start = time.perf_counter()
            moved = [t.to(plan.device, non_blocking=True).to(plan.compute_dtype) for t in raw]
            del raw
            base = moved.pop(0) if plan.uses_base else None
            experts = [None if e.delta else w for e, w in zip(plan.experts, moved, strict=True)]
            deltas = [w if e.delta else None for e, w in zip(plan.experts, moved, strict=True)]
            timer.compute += time.perf_counter() - start
            yield (
                tensor,
                rows,
                TensorInputs(
                    name=tensor.name,
                    base=base,
                    expert_weights=experts,
                    expert_deltas=deltas,
                    seed=plan.recipe.seed,
                    layer=tensor.layer,
                    num_layers=plan.num_layers,
                    offset=0 if rows is None else rows[0] * math.prod(tensor.shape[1:]),
                ),
            )
            del moved, base, experts, deltas  # before the next read: one piece held at a time
