"""Blocks of a model at component granularity, as FlexMerge and `analyze interference` cut it.

Within each transformer layer, the attention module, the MLP and each normalisation are separate
blocks; every tensor outside the layers (embeddings, final norm, output head) is a block of its
own. A block is named after its module path (``model.layers.0.self_attn``,
``model.layers.0.input_layernorm``); the MLP block of a layer gathers whatever in the layer is
neither attention nor a normalisation (an MoE's router and experts included) and is named
``<layer>.mlp`` whatever the architecture calls it (``intermediate``/``output`` in BERT).
"""

from __future__ import annotations

import re

from mergecli.layers import layer_prefix

_NORM = re.compile(r"norm|^ln(?:_|\d|$)", re.IGNORECASE)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def block_of(name: str) -> str:
    """The component block a tensor belongs to (see the module docstring)."""
    prefix = layer_prefix(name)
    if prefix is None:
        return name
    modules = name[len(prefix) + 1 :].split(".")[:-1]  # drop the parameter's own name
    if not modules:
        return name
    for pattern in (_NORM, _ATTENTION):  # a norm inside the attention module is its own block
        for i, module in enumerate(modules):
            if pattern.search(module):
                return ".".join([prefix, *modules[: i + 1]])
    return f"{prefix}.mlp"
