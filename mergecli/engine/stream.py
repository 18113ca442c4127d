"""Stream the inputs of each planned tensor, reading ahead on a background thread."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergecli.engine.plan import LOOKAHEAD, MergePlan, TensorPlan
from mergecli.methods import TensorInputs


@dataclass
class Timer:
    """Seconds spent per stage (busy time; stages overlap, so they may add up to more than wall)."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    bytes_read: int = 0


def _read(plan: MergePlan, tensor: TensorPlan, timer: Timer) -> list[torch.Tensor]:
    """Read one tensor from each source into private memory (safetensors tensors share the
    file's copy-on-write mapping between reads, so they must never be modified in place)."""
    start = time.perf_counter()
    out = []
    for source in plan.read_sources(tensor):
        t = source.read(tensor.name)
        timer.bytes_read += t.nbytes
        if plan.device.type == "cuda":
            t = t.pin_memory()
        elif tensor.merge:
            t = t.to(plan.compute_dtype, copy=True)
        out.append(t)
    timer.read += time.perf_counter() - start
    return out


def stream_inputs(
    plan: MergePlan, tensors: list[TensorPlan], timer: Timer
) -> Iterator[tuple[TensorPlan, TensorInputs | torch.Tensor]]:
    """Yield each tensor's inputs in compute dtype on the plan's device.

    Merged tensors give TensorInputs; copied tensors give the reference's tensor as stored.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-read") as pool:
        pending: deque[tuple[TensorPlan, Future[list[torch.Tensor]]]] = deque()
        queue = iter(tensors)
        for tensor in queue:
            pending.append((tensor, pool.submit(_read, plan, tensor, timer)))
            if len(pending) > LOOKAHEAD:
                break
        while pending:
            tensor, future = pending.popleft()
            raw = future.result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read, plan, nxt, timer)))
            if not tensor.merge:
                yield tensor, raw[0]
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
                TensorInputs(
                    name=tensor.name,
                    base=base,
                    expert_weights=experts,
                    expert_deltas=deltas,
                    seed=plan.recipe.seed,
                    layer=tensor.layer,
                    num_layers=plan.num_layers,
                ),
            )
