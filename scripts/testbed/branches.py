"""Branches of one task trained at a chosen noise scale (optimiser-bias paper, §3.1, App. A.1).

For a learning rate η and batch size B: fine-tune the testbed's base on one task at (η, B) for
the build's fine-tuning steps (the shared checkpoint), then train two branches from it at the
same (η, B), differing only in the order of their mini-batches, and write a linear merge of the
two (α = 0.5) as a recipe for ``mergecli analyze gains``. Every checkpoint records η and B in
its ``training_args.json``, from which ``analyze gains`` computes S̃ = η / (B(1 − μ)).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import BertForSequenceClassification

from scripts.testbed.build import FULL, REDUCED, save
from scripts.testbed.data import examples, load_digits, split_indices
from scripts.testbed.model import encode, make_tokenizer, train, training_args

BRANCHES = ("a", "b")


def setting_name(task: str, lr: float, batch: int) -> str:
    """The folder and recipe name of one setting, such as ``rotate90-lr0.002-b64``."""
    return f"{task}-lr{lr:g}-b{batch}"


def train_branches(testbed: Path, task: str, lr: float, batch: int, out: Path) -> Path:
    """Train the shared checkpoint and both branches into ``out/<setting>/``; return the
    setting's recipe (``out/<setting>.yaml``)."""
    manifest = json.loads((testbed / "testbed.json").read_text())
    if task not in manifest["tasks"]:
        raise SystemExit(f"task '{task}' is not one of the testbed's: {manifest['tasks']}")
    scale = REDUCED if manifest["reduced"] else FULL
    seed, index = manifest["seed"], manifest["tasks"].index(task)
    images, labels = load_digits()
    split = split_indices(len(labels), seed, scale.held_out)
    tokenizer = make_tokenizer()
    data = encode(tokenizer, examples(images[split.train], labels[split.train], task))
    name = setting_name(task, lr, batch)
    folder = out / name
    if folder.exists():
        raise SystemExit(f"{folder} exists; branches are trained into a new folder")
    steps = scale.finetune_steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = BertForSequenceClassification.from_pretrained(testbed / "base").eval()
        shared_seed = seed + 1 + index
        train(model, data, steps, lr, shared_seed, batch=batch)
        save(model, tokenizer, folder / "shared", training_args(steps, lr, shared_seed, batch))
        shared = {k: v.clone() for k, v in model.state_dict().items()}
        for offset, branch in enumerate(BRANCHES, start=1):
            model.load_state_dict(shared)
            branch_seed = 1000 * shared_seed + offset
            args = training_args(steps, lr, branch_seed, batch)
            run = folder / "runs" / branch

            def checkpoint(step: int, run: Path = run, args: dict[str, object] = args) -> None:
                save(model, tokenizer, run / f"checkpoint-{step}", args)

            train(model, data, steps, lr, branch_seed, scale.save_every, checkpoint, batch)
    finally:
        torch.set_num_threads(threads)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": f"{name}/runs/{b}", "name": f"{task}-{b}", "parameters": {"weight": 0.5}}
            for b in BRANCHES
        ],
        "evaluate": {
            "metric": "accuracy",
            "data": str((testbed / "data" / "{task}" / "validation.jsonl").resolve()),
            "tasks": [task],
        },
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
