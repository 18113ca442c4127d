"""What a stream reads: tensors in order, each whole or in row pieces, from which sources.

A read plan says nothing about what is computed: a merge, a statistics pass, FlexMerge's
similarity pass and ``analyze interference`` read through the same kind of plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from mergecli.engine.finite import Mode
from mergecli.methods import Params
from mergecli.sources import Source
from mergecli.sources.readable import Readable

if TYPE_CHECKING:
    from mergecli.methods.statistics import Statistic

LOOKAHEAD = 2
"""Pieces (tensors or row chunks) read ahead of the one being computed, at most."""
READ_AHEAD_BYTES = 256 * 2**20
"""Bytes read ahead, at most: a larger tensor (merged whole) is read when the computation
reaches it, not while the previous one is computed."""

Rows = tuple[int, int] | None
"""Rows ``start:stop`` of a tensor, or None for the whole tensor."""


@dataclass
class TensorPlan:
    """One output tensor: merged from the inputs, or copied from the reference model."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool
    params: Params = field(default_factory=dict)
    layer: int | None = None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def piece_numel(tensor: TensorPlan, rows: Rows) -> int:
    return tensor.numel if rows is None else tensor.numel // tensor.shape[0] * (rows[1] - rows[0])


def observed(tensors: list[TensorPlan], statistics: list[Statistic]) -> list[TensorPlan]:
    """The merged tensors that any of ``statistics`` observes."""
    return [
        t
        for t in tensors
        if t.merge and any(s.tensors is None or t.name in s.tensors for s in statistics)
    ]


def whole(tensor: TensorPlan) -> list[Rows]:
    """Read ``tensor`` in one piece."""
    return [None]


@dataclass
class ReadPlan:
    """The pieces one stream reads, in order, and the sources of each tensor.

    A merged tensor is read from ``base`` (when set) and every expert, and arrives as
    ``TensorInputs`` in the compute dtype on ``device``; a copied tensor is read from
    ``reference`` and arrives as stored.
    """

    tensors: list[TensorPlan]
    pieces: Callable[[TensorPlan], list[Rows]]
    base: Source | None
    experts: list[Source]
    reference: Readable
    device: torch.device
    compute_dtype: torch.dtype
    seed: int = 0
    num_layers: int = 0
    on_nonfinite: Mode = "error"
    """The finite-value guard on every piece read (``warn``: one warning per tensor)."""
    warnings: list[str] = field(default_factory=list)
    keep_bfloat16: bool = False
    """Hand bfloat16 inputs on as stored (statistics and compiled merges that widen them in
    their own loop)."""
    check_reads: bool = True
    """Run the finite-value guard on each merged piece as read; False: the pass that merges
    it checks its inputs (``Piece.unchecked``), or the compiled merge that reads them does."""
    offer_out_dtype: bool = False
    """Tell the merge each tensor's output dtype (``TensorInputs.out_dtype``): its output
    stores the method's result as it is, so a compiled merge may return it in that dtype."""

    @classmethod
    def copies(
        cls,
        tensors: list[TensorPlan],
        source: Readable,
        on_nonfinite: Mode = "error",
        warnings: list[str] | None = None,
    ) -> ReadPlan:
        """Each of ``tensors`` read whole from ``source`` and handed on as stored."""
        cpu = torch.device("cpu")
        return cls(
            tensors, whole, None, [], source, cpu, torch.float32, 0, 0, on_nonfinite, warnings or []
        )

    def input_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a merged input stored as ``stored`` arrives in."""
        return stored if self.keep_bfloat16 and stored == torch.bfloat16 else self.compute_dtype

    def sources(self, tensor: TensorPlan) -> list[Readable]:
        if not tensor.merge:
            return [self.reference]
        return [*([self.base] if self.base is not None else []), *self.experts]

    def tensor_bytes(self, tensor: TensorPlan) -> int:
        """Bytes one tensor's reads take from disk (every source, as stored)."""
        return sum(src.info(tensor.name).nbytes for src in self.sources(tensor))

    @property
    def nbytes(self) -> int:
        """Bytes the whole stream reads."""
        return sum(self.tensor_bytes(t) for t in self.tensors)

    def piece_bytes(self, tensor: TensorPlan, rows: Rows) -> int:
        """Memory that one piece's inputs take once read (in the compute dtype when merged)."""
        item = self.compute_dtype.itemsize if tensor.merge else 0
        return piece_numel(tensor, rows) * sum(
            max(s.info(tensor.name).dtype.itemsize, item) for s in self.sources(tensor)
        )

    def progress(self, tensor: TensorPlan, rows: Rows) -> tuple[int, int]:
        """Tensors finished and bytes read by one piece, for the progress bar."""
        nbytes = self.tensor_bytes(tensor)
        if rows is None:
            return 1, nbytes
        return int(rows[1] == tensor.shape[0]), nbytes * (rows[1] - rows[0]) // tensor.shape[0]

    def subset(self, tensors: list[TensorPlan]) -> ReadPlan:
        """The same plan over some of its tensors (a block, a work unit)."""
        return replace(self, tensors=tensors)
