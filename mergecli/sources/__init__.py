"""Where tensors come from: checkpoint folders, PEFT adapters and Hub snapshots."""

from mergecli.sources.adapter import Adapter
from mergecli.sources.checkpoint import (
    CONFIG_FILES,
    DTYPE_CODES,
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
)
from mergecli.sources.resolve import Source, locate, open_models, open_source

__all__ = [
    "CONFIG_FILES",
    "DTYPE_CODES",
    "SAFETENSORS_DTYPES",
    "TOKENIZER_FILES",
    "Adapter",
    "Checkpoint",
    "Source",
    "TensorInfo",
    "locate",
    "open_models",
    "open_source",
]
