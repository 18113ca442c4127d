"""Where tensors come from: local checkpoint folders (adapters and Hub snapshots plug in here)."""

from mergecli.sources.checkpoint import (
    CONFIG_FILES,
    DTYPE_CODES,
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
)

__all__ = [
    "CONFIG_FILES",
    "DTYPE_CODES",
    "SAFETENSORS_DTYPES",
    "TOKENIZER_FILES",
    "Checkpoint",
    "TensorInfo",
]
