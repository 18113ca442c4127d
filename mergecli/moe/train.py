"""Multi-task training of a sparse MoE's routers and experts, the base's tensors frozen (the
undertraining paper's second MoErging stage, §2.2/§3.3).

The mixture of the tasks' training texts (``moe.train_data``, one file per task with ``{task}``
in the path, or one file) is shuffled with the recipe's seed and cut into batches; AdamW on the
causal-LM loss updates only the router and expert weights. Same seed, data and steps give the
same weights on one device. Training needs forward and backward passes, so the whole model is
loaded (transformers' ``from_pretrained``) from the untrained folder and held in memory; the
trained weights go back as a state dict, which the runner streams into the output's shards
(``moe/sparse_output.write_trained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.errors import RecipeError
from mergecli.evaluate.tasks import read_examples
from mergecli.progress import Progress

TRAINED = (".gate.", ".experts.", "shared_expert")
"""Parameter names of routers and experts (every other parameter is frozen)."""


def train_files(recipe: Any, names: list[str]) -> dict[str, Path]:
    """Task name → training file from ``moe.train_data``; a one-line error where none is set."""
    template = recipe.moe.train_data
    if template is None:
        raise RecipeError(
            "--train-steps: no training data: set moe.train_data (a JSONL or text file per task, "
            "{task} in the path standing for each expert's name)",
            "moe.train_data",
        )
    tasks = names if "{task}" in template else [Path(template).stem]
    files = {t: recipe.resolve_path(template.replace("{task}", t)) for t in tasks}
    for task, path in files.items():
        if not path.is_file():
            raise RecipeError(
                f"moe.train_data: training file '{path}' of task {task} does not exist",
                "moe.train_data",
            )
    return files


def is_trained(name: str) -> bool:
    return any(part in name for part in TRAINED)


def train(
    folder: Path,
    files: dict[str, Path],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str,
    progress: Progress,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train the MoE model in ``folder``; returns the training report (loss per step) and the
    trained weights (float32, CPU, by parameter name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = model.to(device)  # type: ignore[arg-type]
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trained(name))
        if param.requires_grad:
            trained.append(param)
    texts = [row["text"] for path in files.values() for row in read_examples(path, False, None)]
    limit = getattr(model.config, "max_position_embeddings", 512)
    encoded = [
        ids
        for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        if len(ids) > 1
    ]
    if not encoded:
        raise RecipeError("moe.train_data: no text has two tokens to predict", "moe.train_data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(trained, lr=lr)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    progress.start("train router + experts", steps, 0)
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        batch = [encoded[i] for i in order[:batch_size]]
        del order[:batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.advance(1, 0)
    model.eval()
    report = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "device": device,
        "tasks": {task: str(path) for task, path in files.items()},
        "examples": len(encoded),
        "trained_parameters": sum(p.numel() for p in trained),
        "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "loss": losses,
    }
    return report, checkpoint_state(model.to("cpu"))


def checkpoint_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names and in its layout (transformers
    fuses some tensors when it loads them, e.g. Mixtral's experts; ``save_pretrained``
    undoes that with the same conversion)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v.detach() for k, v in model.state_dict().items()}
    return dict(revert_weight_conversion(model, state))
