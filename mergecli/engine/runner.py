"""The one streaming loop: read ahead, run the passes on each piece, write on a writer thread.

Every command that reads tensors (merge, statistics, FlexMerge, ``analyze interference``,
evaluation, temporal folds) runs ``Runner.run`` over a ``ReadPlan`` with a list of passes. A
pass sees each piece in order and may queue work (writes, report sums) for the writer thread.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from mergecli.engine.finite import Mode, check_finite
from mergecli.engine.read_plan import (
    LOOKAHEAD,
    READ_AHEAD_BYTES,
    ReadPlan,
    Rows,
    TensorPlan,
    observed,
)
from mergecli.methods import TensorInputs
from mergecli.methods.statistics import Statistic, StatValues
from mergecli.progress import NullProgress, Progress

WRITE_QUEUE = 2
"""Pieces of work (writes, report sums) waiting for the writer thread, at most."""


@dataclass
class Timer:
    """Seconds spent per stage (busy time; stages overlap, so they may add up to more than wall)
    and bytes read."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    bytes_read: int = 0


@dataclass
class Piece:
    """One piece of the stream: a tensor's rows (or the whole tensor) and its inputs.

    ``inputs`` holds a merged tensor's inputs; ``raw`` a copied tensor as stored. ``merged`` is
    what the merge pass computed, for the passes after it. ``unchecked``: the inputs as read,
    with their source's label and file, when the finite-value guard is left to the merge.
    """

    tensor: TensorPlan
    rows: Rows
    inputs: TensorInputs | None = None
    raw: torch.Tensor | None = None
    merged: Any = None
    unchecked: list[Unchecked] = field(default_factory=list)


@dataclass
class Unchecked:
    """An input piece read without the finite-value guard, and where it came from."""

    tensor: torch.Tensor
    source: str
    file: Path

    def check(self, name: str, mode: Mode, warnings: list[str]) -> None:
        """The finite-value guard on this input piece of tensor ``name``."""
        check_finite(self.tensor, name, self.source, self.file, mode, warnings)


class WriteQueue:
    """Work for the writer thread, run in the order queued; at most ``WRITE_QUEUE`` waiting."""

    def __init__(self, pool: ThreadPoolExecutor, timer: Timer) -> None:
        self._pool = pool
        self._timer = timer
        self._pending: deque[Future[None]] = deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread."""
        self._pending.append(self._pool.submit(fn, *args))

    def write(self, write: Callable[[str, Any], None], name: str, value: Any) -> None:
        """``write(name, value)`` on the writer thread, timed as writing."""
        self.submit(self._timed, write, name, value)

    def _timed(self, write: Callable[[str, Any], None], name: str, value: Any) -> None:
        start = time.perf_counter()
        write(name, value)
        self._timer.write += time.perf_counter() - start

    def drain(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` pieces of work are waiting (raising their errors)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()


class Pass(Protocol):
    """A computation over the pieces of a stream."""

    def piece(self, piece: Piece, queue: WriteQueue) -> None: ...


class Runner:
    """Runs passes over read plans, sharing one timer and one progress reporter."""

    def __init__(self, progress: Progress | None = None, timer: Timer | None = None) -> None:
        self.progress = progress or NullProgress()
        self.timer = timer or Timer()

    def run(self, read: ReadPlan, passes: Sequence[Pass], phase: str | None = None) -> None:
        """Stream every piece of ``read`` through ``passes``; ``phase`` starts a progress phase
        (else the current one advances)."""
        if phase is not None:
            self.progress.start(phase, len(read.tensors), read.nbytes)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-write") as pool:
            queue = WriteQueue(pool, self.timer)
            for piece in self.stream(read):
                for p in passes:
                    p.piece(piece, queue)
                tensor, rows = piece.tensor, piece.rows
                del piece  # the stream reads the next piece once this one is released
                queue.drain(WRITE_QUEUE)
                self.progress.advance(*read.progress(tensor, rows))
            queue.drain()

    def statistics(self, read: ReadPlan, statistics: list[Statistic]) -> StatValues:
        """Stream ``read`` once per pass until every statistic is final (each pass reads the
        tensors that its statistics observe); their values. A ``read`` that does not check
        its pieces leaves the finite-value guard to the merge pass after these."""
        passes = 0
        while any(s.wants_pass() for s in statistics):
            passes += 1
            active = [s for s in statistics if s.wants_pass()]
            read_now = replace(
                read.subset(observed(read.tensors, active)),
                keep_bfloat16=read.device.type == "cpu"
                and read.compute_dtype == torch.float32
                and all(getattr(s, "takes_bfloat16", False) for s in active),
            )
            self.run(read_now, [Observe(active)], f"statistics pass {passes}")
            for statistic in active:
                statistic.end_pass()
        return StatValues.of(statistics)

    def stream(self, read: ReadPlan) -> Iterator[Piece]:
        """Each piece of ``read`` in order, read ahead on a background thread (the row pieces
        of a tensor share its random generators and know their entry offset in it)."""
        waiting = deque((t, rows) for t in read.tensors for rows in read.pieces(t))
        generators: dict[str, dict[int, torch.Generator]] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-read") as pool:
            pending: deque[tuple[TensorPlan, Rows, Future[list[torch.Tensor]], int]] = deque()

            def queue_reads(ahead: bool) -> None:
                """Queue the next reads: those within LOOKAHEAD and READ_AHEAD_BYTES, or (when
                nothing is queued and the computation waits) the next one whatever its size."""
                while waiting:
                    tensor, rows = waiting[0]
                    size = read.piece_bytes(tensor, rows)
                    queued = sum(p[3] for p in pending)
                    if ahead and (len(pending) > LOOKAHEAD or queued + size > READ_AHEAD_BYTES):
                        return
                    waiting.popleft()
                    future = pool.submit(self._read, read, tensor, rows)
                    pending.append((tensor, rows, future, size))
                    if not ahead:
                        return

            while waiting or pending:
                if not pending:
                    queue_reads(ahead=False)
                tensor, rows, future, _ = pending.popleft()
                raw = future.result()
                queue_reads(ahead=True)
                if not tensor.merge:
                    yield Piece(tensor, rows, raw=raw.pop())
                    continue
                unchecked = (
                    []
                    if read.check_reads
                    else [
                        Unchecked(t, s.label, s.info(tensor.name).file)
                        for t, s in zip(raw, read.sources(tensor), strict=True)
                    ]
                )
                start = time.perf_counter()
                moved = [
                    t.to(read.device, non_blocking=True).to(read.input_dtype(t.dtype)) for t in raw
                ]
                del raw
                base = moved.pop(0) if read.base is not None else None
                experts = [None if e.delta else w for e, w in zip(read.experts, moved, strict=True)]
                deltas = [w if e.delta else None for e, w in zip(read.experts, moved, strict=True)]
                if tensor.name not in generators:
                    generators = {tensor.name: {}}
                self.timer.compute += time.perf_counter() - start
                inputs = TensorInputs(
                    name=tensor.name,
                    base=base,
                    expert_weights=experts,
                    expert_deltas=deltas,
                    seed=read.seed,
                    layer=tensor.layer,
                    num_layers=read.num_layers,
                    generators=generators[tensor.name],
                    offset=0 if rows is None else rows[0] * math.prod(tensor.shape[1:]),
                    as_stored=read.keep_bfloat16,
                    out_dtype=tensor.out_dtype if read.offer_out_dtype else None,
                )
                del moved, base, experts, deltas
                yield Piece(tensor, rows, inputs=inputs, unchecked=unchecked)
                del inputs, unchecked  # before the next read: one piece held at a time

    def _read(self, read: ReadPlan, tensor: TensorPlan, rows: Rows) -> list[torch.Tensor]:
        """Read one piece from each source into private memory: in the compute dtype when
        merged on the CPU (converted once, in place of a copy), page-locked as stored for a
        GPU."""
        start = time.perf_counter()
        cuda = read.device.type == "cuda"
        out = []
        for source in read.sources(tensor):
            t = source.read(tensor.name, rows)
            if read.check_reads or not tensor.merge:
                file = source.info(tensor.name).file
                check_finite(t, tensor.name, source.label, file, read.on_nonfinite, read.warnings)
            self.timer.bytes_read += t.nbytes
            if cuda:
                out.append(t.pin_memory())
            else:
                out.append(t.to(read.input_dtype(t.dtype)) if tensor.merge else t)
        self.timer.read += time.perf_counter() - start
        return out


class Observe:
    """The statistics pass: each statistic observes the merged pieces of its tensors."""

    def __init__(self, statistics: list[Statistic]) -> None:
        self.statistics = statistics

    def piece(self, piece: Piece, queue: WriteQueue) -> None:
        assert piece.inputs is not None
        for statistic in self.statistics:
            if statistic.tensors is None or piece.tensor.name in statistic.tensors:
                statistic.observe(piece.inputs)


class Each:
    """A pass that calls ``fn(tensor, inputs)`` on each merged piece (analyses, similarity)."""

    def __init__(self, fn: Callable[[TensorPlan, TensorInputs], None]) -> None:
        self.fn = fn

    def piece(self, piece: Piece, queue: WriteQueue) -> None:
        assert piece.inputs is not None
        self.fn(piece.tensor, piece.inputs)
