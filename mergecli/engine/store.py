"""The output pass: each piece handed to an output's writer, its values written on the writer
thread."""

from __future__ import annotations

import time
from typing import Any

from mergecli.engine.outputs import PieceWriter
from mergecli.engine.runner import Piece, Timer, WriteQueue


class Store:
    """The output pass: what the output writes for each piece, queued for the writer thread;
    the output's per-tensor figures (a LoRA pair's energy kept) in ``extra``."""

    def __init__(self, writer: PieceWriter, timer: Timer) -> None:
        self.writer = writer
        self.timer = timer
        self.extra: dict[str, dict[str, Any]] = {}

    def piece(self, piece: Piece, queue: WriteQueue) -> None:
        start = time.perf_counter()
        if piece.inputs is None:
            assert piece.raw is not None
            written = self.writer.copied(piece.tensor, piece.raw)
        else:
            written, extra = self.writer.merged(piece.tensor, piece.inputs, piece.merged.value)
            if extra:
                self.extra[piece.tensor.name] = extra
            piece.merged = None
            self.timer.compute += time.perf_counter() - start
        for name, value in written:
            queue.write(self.writer.write, name, value)
