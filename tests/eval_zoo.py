"""A tiny sequence-classification zoo for evaluation tests, and direct (unbatched) scoring.

``build_zoo`` writes a BERT classifier base, three experts as training runs
(``runs/<task>/checkpoint-<step>``) and JSONL validation data per task. ``direct_scores``
scores a model example by example with ``from_pretrained`` and no padding: independent of the
evaluator's batching, skeletons and in-memory loading.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers import BertForSequenceClassification as Bert

from scripts.fixtures import VOCAB, save_tokenizer

TASKS = ("a", "b", "c")
STEPS = (10, 20, 30, 40)


def build_zoo(root: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    Bert(config).save_pretrained(root / "base")
    save_tokenizer(root / "base")
    rows = []
    for t, task in enumerate(TASKS):
        rnd = random.Random(t)
        (root / "data" / task).mkdir(parents=True)
        with (root / "data" / task / "validation.jsonl").open("w") as handle:
            for _ in range(24):
                words = [f"w{rnd.randrange(61)}" for _ in range(rnd.randrange(2, 12))]
                rows.append({"text": " ".join(words), "label": rnd.randrange(3)})
                handle.write(json.dumps(rows[-1]) + "\n")
    tuned = _tune(root / "base", rows)
    for t, task in enumerate(TASKS):
        for step in STEPS:
            model = Bert.from_pretrained(root / "base")
            gen = torch.Generator().manual_seed(100 * t + step)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    noise = torch.randn(param.shape, generator=gen) * _noise(t, step)
                    param.copy_(tuned[name] + noise)
            folder = root / "runs" / task / f"checkpoint-{step}"
            model.save_pretrained(folder)
            save_tokenizer(folder)
    return root


def _noise(task: int, step: int) -> float:
    """How far a checkpoint strays from the tuned model: least at step 20, 30, 20 for tasks a,
    b, c (a stand-in for undertraining and overfitting around T*)."""
    return 0.004 + 0.006 * abs(step - (20, 30, 20)[task]) / 10


def _tune(base: Path, rows: list[dict]) -> dict[str, torch.Tensor]:
    """The base fitted a little to every task's data: the common direction experts share
    (each expert adds its own noise, so averaging experts helps, as in a soup)."""
    model = Bert.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(15):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def direct_scores(
    model: torch.nn.Module, tokenizer_folder: Path, data: Path
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a classifier, one example at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    correct, losses = 0, []
    with torch.no_grad():
        for row in examples(data):
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
            correct += int(logits.argmax()) == row["label"]
            losses.append(float(F.cross_entropy(logits[None], torch.tensor([row["label"]]))))
    n = len(losses)
    return correct / n, sum(losses) / n


def load_classifier(folder: Path, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """``from_pretrained(folder)``, with ``state`` (a dense merge) loaded over it."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()
