"""Where a tensor sits in a transformer: its layer index and its relative depth.

Convention (used by parameter gradients and `lines`): tensors of layer ``l`` of ``L`` sit at
``l / (L - 1)``; tensors outside the layers sit at 0 when they are input embeddings (they come
before the first layer) and at 1 otherwise (final norm, output head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to, or None for tensors outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def count_layers(names: Iterable[str]) -> int:
    """Number of transformer layers named in a set of tensor names (max index + 1)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def is_before_layers(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (input embeddings)."""
    return bool(_EMBED.search(name))


def layer_position(name: str, num_layers: int) -> float:
    """Relative depth in [0, 1] of a tensor (see the module docstring)."""
    index = layer_index(name)
    if index is None:
        return 0.0 if is_before_layers(name) else 1.0
    return index / (num_layers - 1) if num_layers > 1 else 0.0


def layer_prefix(name: str) -> str | None:
    """The name up to and including its layer index ('model.layers.3'); None outside layers."""
    match = _LAYER.search(name)
    return name[: match.end() - 1] if match else None
