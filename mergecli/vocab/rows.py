"""Where each row of a vocabulary tensor (input embeddings, output head) over the merge's new
vocabulary comes from, for every input, and the read of rows ``start:stop`` from the stored rows
they need (mergekit 0.1.5's PermutedEmbeddings, streamed).

An input's row of output token r is its own row of that token, unless it lacks the token or the
token is forced; then the token's default:

- a ``tokenizer.tokens`` source: a model's row of that token, a model's row of another token
  (``model_token``, by id or by token), or zeros (``kind: zero``);
- otherwise, by how many inputs have the token: one → that input's row; none → zeros (with a
  warning); several → the base's row when the base has it, else the mean of their rows.

Rows past the vocabulary (``pad_to_multiple_of``) hold the mean of the input's rows over the
vocabulary. Only the inputs holding the tensor count (a tied head is not a tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ZERO = -2
"""A default of zeros."""
MEAN = -1
"""A default that is the mean of the rows of the inputs having the token."""
GAP = 64
"""Stored rows with at most this many unneeded rows between them are read in one slice."""
BLOCK_ELEMENTS = 1 << 20
"""Entries computed at once (in float64): a read of many rows is filled block by block."""

Reader = Callable[[int, int, int], torch.Tensor]
"""``read(input, start, stop)``: stored rows ``start:stop`` of the tensor from one input."""


@dataclass
class TokenDefault:
    """A configured default for one output token: ``model``'s ``row`` (an input index, or
    ``ZERO``), ``force``d on every input or not; ``model`` None keeps the rule by count."""

    model: int | None
    row: int
    force: bool


class RowMap:
    """The rows of one vocabulary tensor for every input holding it.

    ``perms[k][r]`` is input k's row of output token r, −1 where it lacks it; ``holders`` the
    inputs holding the tensor; ``base`` the base's input index (None without a base);
    ``configured`` the ``tokenizer.tokens`` defaults by output id; ``rows`` the output's row
    count (the vocabulary, padded); ``width`` the shape of one row.
    """

    def __init__(
        self,
        perms: np.ndarray,
        holders: list[int],
        base: int | None,
        configured: dict[int, TokenDefault],
        rows: int,
        width: tuple[int, ...],
    ) -> None:
        self.perms = perms
        self.holders = holders
        self.vocab = perms.shape[1]
        self.rows = rows
        self.width = width
        self.block = max(1, BLOCK_ELEMENTS // max(1, int(np.prod(width))))
        held = perms[holders]
        present = held >= 0
        self.count = present.sum(axis=0)
        self.model = np.full(self.vocab, MEAN, dtype=np.int64)
        self.row = np.full(self.vocab, -1, dtype=np.int64)
        self.force = np.zeros(self.vocab, dtype=bool)
        one = self.count == 1
        donor = np.asarray(holders)[present.argmax(axis=0)]
        self.model[one] = donor[one]
        self.row[one] = perms[donor[one], np.flatnonzero(one)]
        self.model[self.count == 0] = ZERO
        if base is not None and base in holders:
            by_base = (self.count > 1) & (perms[base] >= 0)
            self.model[by_base] = base
            self.row[by_base] = perms[base][by_base]
        for token, default in configured.items():
            self.force[token] = default.force
            if default.model is not None:
                self.model[token], self.row[token] = default.model, default.row
        unfilled = self.count == 0
        unfilled[[t for t, d in configured.items() if d.model is not None]] = False
        self.absent = int(unfilled.sum())
        """Tokens no input has and no ``tokenizer.tokens`` entry fills (zeros, warned)."""
        self._means: dict[int, torch.Tensor] = {}

    def read(
        self, k: int, start: int, stop: int, reader: Reader, dtype: torch.dtype
    ) -> torch.Tensor:
        """Input ``k``'s rows ``start:stop`` of the tensor, in ``dtype``, computed block by
        block (so a whole tensor costs one block beyond itself)."""
        out = torch.empty((stop - start, *self.width), dtype=dtype)
        for a in range(start, min(stop, self.vocab), self.block):
            b = min(a + self.block, stop, self.vocab)
            out[a - start : b - start] = self._rows(k, a, b, reader)
        if stop > self.vocab:
            out[max(start, self.vocab) - start :] = self.mean(k, reader)
        return out

    def mean(self, k: int, reader: Reader) -> torch.Tensor:
        """The mean of input ``k``'s rows over the vocabulary (float64), summed in chunks."""
        if k not in self._means:
            total = torch.zeros(self.width, dtype=torch.float64)
            for a in range(0, self.vocab, self.block):
                total += self._rows(k, a, min(a + self.block, self.vocab), reader).sum(0)
            self._means[k] = total / self.vocab
        return self._means[k]

    def _rows(self, k: int, start: int, stop: int, reader: Reader) -> torch.Tensor:
        """Rows ``start:stop`` (< vocab) of input ``k``, float64: each the sum of its stored
        source rows, divided by their count for a mean."""
        tokens = np.arange(start, stop)
        own = (self.perms[k, tokens] >= 0) & ~self.force[tokens]
        model = np.where(own, k, self.model[tokens])
        row = np.where(own, self.perms[k, tokens], self.row[tokens])
        # (output position, input, stored row) of every contribution
        pos = [np.flatnonzero(model >= 0)]
        src = [model[pos[0]]]
        stored = [row[pos[0]]]
        mean = np.flatnonzero(model == MEAN)
        divisor = np.ones(len(tokens))
        divisor[mean] = self.count[tokens[mean]]
        for h in self.holders:
            has = mean[self.perms[h, tokens[mean]] >= 0]
            pos.append(has)
            src.append(np.full(len(has), h))
            stored.append(self.perms[h, tokens[has]])
        positions, inputs, rows = (np.concatenate(x) for x in (pos, src, stored))
        out = torch.zeros((len(tokens), *self.width), dtype=torch.float64)
        for h in np.unique(inputs):
            mine = inputs == h
            values = gather(reader, int(h), rows[mine])
            out.index_add_(0, torch.from_numpy(positions[mine]), values)
        return out / torch.from_numpy(divisor).reshape(-1, *([1] * (out.dim() - 1)))


def gather(reader: Reader, k: int, rows: np.ndarray) -> torch.Tensor:
    """Stored rows ``rows`` of input ``k`` (float64, in that order), read as few slices: rows
    with at most ``GAP`` unneeded rows between them share one."""
    wanted = np.unique(rows)
    breaks = np.flatnonzero(np.diff(wanted) > GAP + 1) + 1
    starts = wanted[np.r_[0, breaks]]
    stops = wanted[np.r_[breaks - 1, len(wanted) - 1]] + 1
    slices = [
        reader(k, int(a), int(b)).to(torch.float64) for a, b in zip(starts, stops, strict=True)
    ]
    offsets = np.r_[0, np.cumsum(stops - starts)[:-1]]
    which = np.searchsorted(starts, rows, side="right") - 1
    index = offsets[which] + rows - starts[which]
    return torch.cat(slices)[torch.from_numpy(index)]
