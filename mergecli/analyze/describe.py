"""`inspect`: what a checkpoint, PEFT adapter or training-run folder holds.

Only headers and configuration files are read, never a tensor's data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mergecli.analyze.runs import run_checkpoints
from mergecli.errors import SourceError
from mergecli.layers import count_layers
from mergecli.sources import Checkpoint
from mergecli.sources.adapter import peft_type, read_peft_config
from mergecli.sources.hub import hub_snapshot, parse_hub_id

CONFIG_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under a folder (links not followed)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def weights(checkpoint: Checkpoint) -> dict[str, Any]:
    """Tensors, parameters per dtype, shards and layers, from the weight files' headers."""
    names = checkpoint.tensor_names()
    dtypes: Counter[str] = Counter()
    per_file: Counter[Path] = Counter()
    for name in names:
        info = checkpoint.info(name)
        dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
        per_file[info.file] += 1
    return {
        "tensors": len(names),
        "parameters": sum(dtypes.values()),
        "dtypes": dict(dtypes.most_common()),
        "layers": count_layers(names),
        "shards": [
            {"file": f.name, "tensors": per_file[f], "bytes": f.stat().st_size}
            for f in sorted(checkpoint.files)
        ],
        "weights_bytes": checkpoint.nbytes,
    }


def adapter(folder: Path) -> dict[str, Any]:
    """Type, rank, scaling, targets and base model of a PEFT adapter (via peft's PeftConfig)."""
    config = read_peft_config(folder, str(folder))
    targets = getattr(config, "target_modules", None)
    return {
        "type": peft_type(config),
        "rank": getattr(config, "r", None),
        "alpha": getattr(config, "lora_alpha", None),
        "targets": sorted(targets) if isinstance(targets, set | list | tuple) else targets,
        "base": config.base_model_name_or_path,
        "task_type": str(getattr(config.task_type, "value", config.task_type) or "") or None,
        "rank_pattern": getattr(config, "rank_pattern", None) or None,
        "alpha_pattern": getattr(config, "alpha_pattern", None) or None,
        "feedforward_modules": getattr(config, "feedforward_modules", None),
        "use_dora": getattr(config, "use_dora", None),
        "use_rslora": getattr(config, "use_rslora", None),
        "modules_to_save": getattr(config, "modules_to_save", None),
    }


def describe_path(path: str | Path) -> dict[str, Any]:
    """A summary of a checkpoint, adapter or training-run folder, or of a Hub model (fetched
    into the cache), from its headers and config: kind, weights, config."""
    folder = Path(path).expanduser()
    if not folder.exists():
        hub = parse_hub_id(str(path))
        if hub is None:
            raise SourceError(f"'{folder}' does not exist", path=folder)
        folder = hub_snapshot(*hub, "inspect")
    if not folder.is_dir():
        raise SourceError(
            f"'{folder}' is a file; inspect takes a checkpoint or adapter folder", path=folder
        )
    out: dict[str, Any] = {"path": str(folder.resolve()), "size_on_disk": folder_bytes(folder)}
    runs = run_checkpoints(folder)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if (folder / "adapter_config.json").is_file():
        out["kind"] = "adapter"
        out["adapter"] = adapter(folder)
    elif has_weights:
        out["kind"] = "checkpoint"
    elif runs:
        out["kind"] = "training_run"
    else:
        raise SourceError(
            f"'{folder}' holds no weights (*.safetensors), adapter_config.json or "
            "checkpoint-<step> folders",
            path=folder,
        )
    if has_weights:
        checkpoint = Checkpoint(folder, str(folder), allow_bin=True)
        out.update(weights(checkpoint))
        config = checkpoint.config() or {}
        out["config"] = {k: config[k] for k in CONFIG_KEYS if k in config}
    if runs:
        out["checkpoints"] = [
            {"step": step, "path": str(p), "bytes": folder_bytes(p)} for step, p in runs.items()
        ]
    return out
