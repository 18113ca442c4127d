"""Load a FlexMerge artifact for serving: every task's model in memory at once, sharing blocks.

A stored tensor that several tasks use (their common group's block, a tensor outside the blocks)
is read once and the very same tensor object goes into each of those tasks' state dicts, so a
block shared by k tasks is held once, as in the paper's inference setup. A mask method's
multi-member group is rebuilt per task (θ0 + scale_t · (mask_t ⊙ unified)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.artifacts import open_artifact
from mergecli.artifacts.flex import FlexArtifact
from mergecli.errors import SourceError


def task_state_dicts(path: str | Path, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Every task's state dict; tensors stored once are shared objects across tasks."""
    artifact = open_artifact(path)
    if not isinstance(artifact, FlexArtifact):
        raise SourceError(f"'{path}' is not a FlexMerge artifact (no flex.json)", path=path)
    cache: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for task in artifact.task_names():
        state = {}
        for name in artifact.tensor_names():
            key = artifact.stored_key(task, name)
            if key is None:
                state[name] = artifact.task_tensor(task, name).to(device)
                continue
            if key not in cache:
                cache[key] = artifact.store.read(key).to(device)
            state[name] = cache[key]
        states[task] = state
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
