"""Fine-tune one testbed task from any starting checkpoint, as the build trains its experts
(same steps, rate, seed and best-validation-accuracy checkpoint): the ``temporal.train``
command of ``mergecli temporal evaluate`` (docs/testbed.md, "Temporal merging over time")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import BertForSequenceClassification

from scripts.testbed.build import FULL, LEARNING_RATE, REDUCED, save
from scripts.testbed.data import examples, load_digits, read_jsonl, split_indices
from scripts.testbed.model import accuracy, encode, make_tokenizer, train, training_args


def train_expert(testbed: Path, task: str, init: Path, output: Path) -> Path:
    """Train ``task`` from ``init`` and write its best-validation checkpoint to ``output``."""
    manifest = json.loads((testbed / "testbed.json").read_text())
    if task not in manifest["tasks"]:
        raise SystemExit(f"task '{task}' is not one of the testbed's: {manifest['tasks']}")
    scale = REDUCED if manifest["reduced"] else FULL
    seed = manifest["seed"]
    run_seed = seed + 1 + manifest["tasks"].index(task)
    images, labels = load_digits()
    split = split_indices(len(labels), seed, scale.held_out)
    tokenizer = make_tokenizer()
    data = encode(tokenizer, examples(images[split.train], labels[split.train], task))
    validation = encode(tokenizer, read_jsonl(testbed / "data" / task / "validation.jsonl"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = BertForSequenceClassification.from_pretrained(init).eval()
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None

        def checkpoint(step: int) -> None:
            nonlocal best
            score = accuracy(model, validation)
            if best is None or score > best[0]:
                best = (score, step, {k: v.clone() for k, v in model.state_dict().items()})

        train(
            model, data, scale.finetune_steps, LEARNING_RATE, run_seed, scale.save_every, checkpoint
        )
    finally:
        torch.set_num_threads(threads)
    assert best is not None
    model.load_state_dict(best[2])
    if output.exists():
        shutil.rmtree(output)
    save(model, tokenizer, output, training_args(scale.finetune_steps, LEARNING_RATE, run_seed))
    return output
