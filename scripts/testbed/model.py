"""The testbed's model: a small BERT sequence classifier over intensity tokens, and its training."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from scripts.testbed.data import PATCH, PATCHES, SHADES

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = [*SPECIALS, *("".join(p) for p in itertools.product("0123"[:SHADES], repeat=PATCH**2))]
NUM_LABELS = 10


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: ``[CLS] 16 patch tokens [SEP]``."""
    ids = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=PATCHES + 2,
    )


def make_model(seed: int) -> BertForSequenceClassification:
    """A freshly initialised 2-layer BERT classifier (about 110 k parameters)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=PATCHES + 2,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


@dataclass
class Encoded:
    """Token ids (n, 18) and labels (n,) of one data part."""

    ids: torch.Tensor
    labels: torch.Tensor


def encode(tokenizer: PreTrainedTokenizerFast, records: list[dict[str, str | int]]) -> Encoded:
    batch = tokenizer([str(r["text"]) for r in records], return_tensors="pt")
    return Encoded(batch["input_ids"], torch.tensor([int(r["label"]) for r in records]))


@torch.no_grad()
def accuracy(model: BertForSequenceClassification, data: Encoded, batch: int = 512) -> float:
    """Fraction of correctly classified examples."""
    model.eval()
    hits = sum(
        int((model(input_ids=ids).logits.argmax(-1) == y).sum())
        for ids, y in zip(data.ids.split(batch), data.labels.split(batch), strict=True)
    )
    return hits / len(data.labels)


@torch.no_grad()
def mean_loss(model: BertForSequenceClassification, data: Encoded, batch: int = 512) -> float:
    """Mean cross-entropy of the labels."""
    model.eval()
    total = sum(
        float(torch.nn.functional.cross_entropy(model(input_ids=ids).logits, y, reduction="sum"))
        for ids, y in zip(data.ids.split(batch), data.labels.split(batch), strict=True)
    )
    return total / len(data.labels)


def batches(data: Encoded, size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded shuffled mini-batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data.labels), generator=gen)
        for chunk in order.split(size):
            if len(chunk) == size:
                yield data.ids[chunk], data.labels[chunk]


def training_args(steps: int, lr: float, seed: int, batch: int = 64) -> dict[str, object]:
    """What ``train`` does, in the keys of Hugging Face's ``training_args.json``
    (``TrainingArguments.to_json_string()``), which ``mergecli analyze gains`` reads."""
    return {
        "max_steps": steps,
        "learning_rate": lr,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.01,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": max(1, steps // 20),
        "seed": seed,
    }


def train(
    model: BertForSequenceClassification,
    data: Encoded,
    steps: int,
    lr: float,
    seed: int,
    every: int = 0,
    on_save: Callable[[int], None] | None = None,
    batch: int = 64,
) -> None:
    """AdamW with a short warm-up then a constant rate; ``on_save(step)`` every ``every`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    stream = batches(data, batch, seed)
    for step in range(1, steps + 1):
        model.train()
        ids, y = next(stream)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_save and every and step % every == 0:
            on_save(step)
    model.eval()
