"""Build the testbed: a pretrained base, task experts with intermediate checkpoints, held-out data.

Layout and manifest are the contract in docs/testbed.md (section "Layout").
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

from scripts.testbed.data import TRANSFORMS, examples, load_digits, split_indices, write_jsonl
from scripts.testbed.model import (
    Encoded,
    accuracy,
    encode,
    make_model,
    make_tokenizer,
    mean_loss,
    train,
    training_args,
)

LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
LEARNING_RATE = 2e-3  # AdamW, pretraining and fine-tuning


@dataclass(frozen=True)
class Scale:
    """How much work a build does."""

    tasks: int
    pretrain_steps: int
    finetune_steps: int
    save_every: int
    held_out: int | None  # cap on validation/test examples per task


FULL = Scale(tasks=8, pretrain_steps=2000, finetune_steps=500, save_every=25, held_out=None)
REDUCED = Scale(tasks=6, pretrain_steps=200, finetune_steps=60, save_every=15, held_out=120)


def save(
    model: BertForSequenceClassification,
    tokenizer: PreTrainedTokenizerFast,
    folder: Path,
    args: dict[str, object],
) -> None:
    """The checkpoint, its tokenizer and the arguments that trained it (``training_args.json``)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps(args, indent=2) + "\n")


def task_arithmetic(
    base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: float
) -> dict[str, torch.Tensor]:
    """θ = θ_base + λ Σ_t (θ_t − θ_base), the dense reference formula."""
    return {k: v + lam * sum(e[k] - v for e in experts) for k, v in base.items()}


def build(out: Path, reduced: bool = False, seed: int = 0) -> Path:
    """Write the testbed into ``out`` (a new or empty folder) and return it.

    Runs on one CPU thread: a model this small trains fastest so (threads only contend) and the
    weights then do not depend on the machine's core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(out), REDUCED if reduced else FULL, seed)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, scale: Scale, seed: int) -> Path:
    tasks = list(TRANSFORMS)[: scale.tasks]
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; the testbed is built into a new or empty folder")
    images, labels = load_digits()
    split = split_indices(len(labels), seed, scale.held_out)
    tokenizer = make_tokenizer()

    def part(indices: object, task: str | None) -> list[dict[str, str | int]]:
        return examples(images[indices], labels[indices], task)

    model = make_model(seed)
    train(
        model, encode(tokenizer, part(split.train, None)), scale.pretrain_steps, LEARNING_RATE, seed
    )
    save(model, tokenizer, out / "base", training_args(scale.pretrain_steps, LEARNING_RATE, seed))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    held: dict[str, dict[str, Encoded]] = {}
    runs: dict[str, dict[str, object]] = {}
    expert_states: list[dict[str, torch.Tensor]] = []
    for i, task in enumerate(tasks):
        held[task] = {}
        for name, indices in (("validation", split.validation), ("test", split.test)):
            records = part(indices, task)
            write_jsonl(out / "data" / task / f"{name}.jsonl", records)
            held[task][name] = encode(tokenizer, records)
        model.load_state_dict(base_state)
        curve: dict[int, float] = {}
        losses: dict[int, float] = {}

        run_args = training_args(scale.finetune_steps, LEARNING_RATE, seed + 1 + i)

        def checkpoint(
            step: int,
            task: str = task,
            curve: dict[int, float] = curve,
            losses: dict[int, float] = losses,
            args: dict[str, object] = run_args,
        ) -> None:
            save(model, tokenizer, out / "runs" / task / f"checkpoint-{step}", args)
            curve[step] = accuracy(model, held[task]["validation"])
            losses[step] = mean_loss(model, held[task]["validation"])

        training = part(split.train, task)
        write_jsonl(out / "data" / task / "train.jsonl", training)
        data = encode(tokenizer, training)
        train(
            model,
            data,
            scale.finetune_steps,
            LEARNING_RATE,
            seed + 1 + i,
            scale.save_every,
            checkpoint,
        )
        best = max(curve, key=lambda s: (curve[s], -s))
        shutil.copytree(out / "runs" / task / f"checkpoint-{best}", out / "experts" / task)
        model.load_state_dict(
            BertForSequenceClassification.from_pretrained(out / "experts" / task).state_dict()
        )
        expert_states.append({k: v.clone() for k, v in model.state_dict().items()})
        runs[task] = {
            "steps": sorted(curve),
            "best_step": best,
            "validation": curve,
            "validation_loss": losses,
            "tstar": min(losses, key=lambda s: (losses[s], s)),
        }

    def scores(state: dict[str, torch.Tensor], part_name: str) -> dict[str, float]:
        model.load_state_dict(state)
        return {t: accuracy(model, held[t][part_name]) for t in tasks}

    def mean(values: dict[str, float]) -> float:
        return sum(values.values()) / len(values)

    lam = max(
        LAMBDAS,
        key=lambda x: mean(scores(task_arithmetic(base_state, expert_states, x), "validation")),
    )
    test = {
        "base": scores(base_state, "test"),
        "experts": {t: scores(s, "test")[t] for t, s in zip(tasks, expert_states, strict=True)},
        "task_arithmetic": scores(task_arithmetic(base_state, expert_states, lam), "test"),
    }
    manifest = {
        "seed": seed,
        "reduced": scale == REDUCED,
        "metric": "accuracy",
        "num_labels": 10,
        "tasks": tasks,
        "base": "base",
        "runs": runs,
        "data": {
            t: {p: f"data/{t}/{p}.jsonl" for p in ("train", "validation", "test")} for t in tasks
        },
        "task_arithmetic_lambda": lam,
        "test_accuracy": test,
        "average_test_accuracy": {name: mean(values) for name, values in test.items()},
    }
    (out / "testbed.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
