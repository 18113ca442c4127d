"""LiNeS: layer-increasing scaling of the merged task vector of any task-vector method."""

from __future__ import annotations

import torch

from mergecli.layers import layer_position
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import REQUIRED, Param, Params, get_method, merge_method
from mergecli.methods.result import Merged, as_merged


@merge_method(
    "lines",
    "LiNeS: scale the merged task vector of base_method by λl = α + β·l/(L−1) in layer l "
    "(α before the first layer, α+β after the last); takes base_method's parameters too",
    params=(
        Param("alpha", REQUIRED, help="scale α of the first layer and the embeddings"),
        Param("beta", REQUIRED, help="increase β of the scale up to the last layer"),
        Param(
            "base_method",
            "task_arithmetic",
            str,
            "the task-vector method whose merged task vector is scaled",
        ),
    ),
    composes="base_method",
    convention=(
        "The scale multiplies the base method's whole merged delta (its own λ included). "
        "Layers are found by name (layers.N., h.N., blocks.N.); tensors outside the layers "
        "sit before them when they are embeddings, after them otherwise (final norm, head)."
    ),
)
def lines(inputs: TensorInputs, p: Params) -> Merged:
    merged = as_merged(get_method(p["base_method"]).fn(inputs, p), inputs.num_experts)
    assert isinstance(merged.value, torch.Tensor) and inputs.base is not None
    scale = p["alpha"] + p["beta"] * layer_position(inputs.name, inputs.num_layers)
    return Merged(inputs.base + scale * (merged.value - inputs.base), merged.kept)
