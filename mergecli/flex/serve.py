"""Load a FlexMerge artifact for serving: every task's model in memory at once, sharing blocks.

A stored tensor that several tasks use (their common group's block, a tensor outside the blocks)
is read once and the very same tensor object goes into each of those tasks' state dicts, so a
block shared by k tasks is held once, as in the paper's inference setup. A mask method's
multi-member group is rebuilt per task (θ0 + scale_t · (mask_t ⊙ unified)). Serving needs every
task's whole model, so everything is loaded; the runner reads it (``engine/whole.read_whole``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts import open_artifact
from mergecli.artifacts.flex import FlexArtifact
from mergecli.artifacts.source import TaskSource
from mergecli.engine.whole import read_whole
from mergecli.errors import SourceError


def task_state_dicts(path: str | Path, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Every task's state dict; tensors stored once are shared objects across tasks."""
    artifact = open_artifact(path)
    if not isinstance(artifact, FlexArtifact):
        raise SourceError(f"'{path}' is not a FlexMerge artifact (no flex.json)", path=path)
    names = artifact.tensor_names()
    keys = {t: {n: artifact.stored_key(t, n) for n in names} for t in artifact.task_names()}
    stored = list(dict.fromkeys(k for by in keys.values() for k in by.values() if k is not None))
    cache = {k: t.to(device) for k, t in read_whole(artifact.store, stored).items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for task, by_name in keys.items():
        rebuilt = read_whole(
            TaskSource(artifact, task), [n for n, k in by_name.items() if k is None]
        )
        states[task] = {
            n: rebuilt[n].to(device) if k is None else cache[k] for n, k in by_name.items()
        }
    return states


def task_models(path: str | Path, device: str = "cpu", model_class: Any = None) -> dict[str, Any]:
    """Every task's transformers model (``AutoModelForCausalLM`` unless ``model_class``), built
    on the meta device and assigned the shared tensors of ``task_state_dicts``; buffers that
    are not in the state dict (rotary frequencies) come from one model built on ``device``."""
    import transformers

    cls = model_class or transformers.AutoModelForCausalLM
    config = transformers.AutoConfig.from_pretrained(Path(path))
    with torch.device(device):
        template = dict(cls.from_config(config).named_buffers())
    models = {}
    for task, state in task_state_dicts(path, device).items():
        with torch.device("meta"):
            model = cls.from_config(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._buffers[attr] = template[name]
        models[task] = model.eval()
    return models
