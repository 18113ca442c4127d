"""The blocks FlexMerge merges: consecutive parts of the model, in model order.

Granularity ``component`` (the default) cuts as ``mergecli.blocks`` does (attention, MLP and each
normalisation of a layer; every tensor outside the layers alone); ``layer`` keeps each
transformer layer whole; ``tensor`` makes every tensor a block; a list of regular expressions
puts a tensor in the block named by the text that the first matching pattern matches (a tensor
that no pattern matches is a block of its own).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mergecli.blocks import block_of
from mergecli.engine.plan import TensorPlan
from mergecli.engine.task_artifact import packed_numel
from mergecli.errors import RecipeError
from mergecli.layers import is_before_layers, layer_index, layer_prefix

Granularity = str | list[str]


@dataclass
class Block:
    """One block: its name and its merged tensors, in model order."""

    name: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the block in the output dtype."""
        return sum(t.numel * t.out_dtype.itemsize for t in self.tensors)

    @property
    def mask_bytes(self) -> int:
        """Bytes of one task's packed one-bit masks of the block."""
        return sum(packed_numel(t.numel) for t in self.tensors)


def block_namer(granularity: Granularity) -> Callable[[str], str]:
    """The function naming the block of a tensor for a granularity."""
    if granularity == "component":
        return block_of
    if granularity == "layer":
        return lambda name: layer_prefix(name) or name
    if granularity == "tensor":
        return lambda name: name
    if isinstance(granularity, str) or not granularity:
        raise RecipeError(
            f"flex.granularity: '{granularity}' is not component, layer, tensor or a list of "
            "patterns",
            key="flex.granularity",
        )
    patterns = []
    for i, text in enumerate(granularity):
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise RecipeError(
                f"flex.granularity[{i}]: invalid pattern '{text}': {exc}",
                key=f"flex.granularity[{i}]",
            ) from None

    def named(name: str) -> str:
        for pattern in patterns:
            match = pattern.search(name)
            if match and match.group(0):
                return match.group(0)
        return name

    return named


def cut_blocks(tensors: list[TensorPlan], granularity: Granularity) -> list[Block]:
    """The blocks of the merged tensors in model order (``model_position`` of their first
    tensor, then name order)."""
    namer = block_namer(granularity)
    blocks: dict[str, Block] = {}
    for tensor in tensors:
        if tensor.merge:
            name = namer(tensor.name)
            blocks.setdefault(name, Block(name, [])).tensors.append(tensor)
    if not blocks:
        raise RecipeError("flex: the model has no tensor to merge", key="flex.granularity")
    return sorted(blocks.values(), key=lambda b: model_position(b.tensors[0].name))


def model_position(name: str) -> tuple[int, int]:
    """Where a tensor sits in the forward pass: input embeddings, the layers in order, then the
    rest (final norm, head); a stable sort keeps name order within each."""
    index = layer_index(name)
    if index is not None:
        return 1, index
    return (0, 0) if is_before_layers(name) else (2, 0)
