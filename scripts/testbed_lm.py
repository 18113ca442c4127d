"""A causal-LM variant of the reduced testbed, for sparse (Mixtral) MoEs and their training stage.

Same digits, tasks and seeded split as scripts/testbed/data.py; each example becomes the text
``"<16 patch words> = d<label>"`` for a tiny ``LlamaForCausalLM`` (hidden 64, 2 layers,
intermediate 128, 4 heads). The base is pretrained on the upright training texts, then one full
expert per task is fine-tuned from it with a ``checkpoint-<step>`` folder every ``every`` steps.
Layout: ``base/``, ``runs/<task>/checkpoint-<step>/``, ``data/<task>/{train,validation}.jsonl``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scripts.testbed.build import REDUCED
from scripts.testbed.data import (
    PATCH,
    PATCHES,
    SHADES,
    TRANSFORMS,
    examples,
    load_digits,
    split_indices,
    write_jsonl,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = [
    *SPECIALS,
    *("".join(p) for p in itertools.product("0123"[:SHADES], repeat=PATCH**2)),
    "=",
    *(f"d{i}" for i in range(10)),
]
LENGTH = PATCHES + 3  # <s>, 16 patch words, "=", label word
LEARNING_RATE = 2e-3


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: ``<s>`` then the words of the text."""
    ids = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", ids["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=LENGTH,
    )


def make_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def texts(records: list[dict[str, str | int]]) -> list[dict[str, str | int]]:
    return [{"text": f"{r['text']} = d{r['label']}"} for r in records]


def train(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    steps: int,
    seed: int,
    save: Callable[[int], None] | None = None,
) -> None:
    """AdamW on the causal-LM loss, batches of 64; ``save(step)`` after every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < 64:
            order += torch.randperm(len(ids), generator=gen).tolist()
        batch = ids[order[:64]]
        del order[:64]
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if save:
            save(step)
    model.eval()


def build_lm(out: Path, pretrain_steps: int, steps: int, every: int, seed: int = 0) -> list[str]:
    """Write the causal-LM testbed into ``out`` (skipped when built) and return its tasks."""
    tasks = list(TRANSFORMS)[: REDUCED.tasks]
    if (out / "runs" / tasks[-1] / f"checkpoint-{steps}").exists():
        return tasks
    images, labels = load_digits()
    split = split_indices(len(labels), seed, REDUCED.held_out)
    tokenizer = make_tokenizer()

    def encode(indices: object, task: str | None) -> torch.Tensor:
        rows = texts(examples(images[indices], labels[indices], task))
        return torch.tensor(tokenizer([str(r["text"]) for r in rows])["input_ids"])

    model = make_model(seed)
    train(model, encode(split.train, None), pretrain_steps, seed)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(tasks):
        for name, indices in (("train", split.train), ("validation", split.validation)):
            records = texts(examples(images[indices], labels[indices], task))
            write_jsonl(out / "data" / task / f"{name}.jsonl", records)
        model.load_state_dict(base)

        def save(step: int, task: str = task) -> None:
            if step % every == 0:
                model.save_pretrained(out / "runs" / task / f"checkpoint-{step}")
                tokenizer.save_pretrained(out / "runs" / task / f"checkpoint-{step}")

        train(model, encode(split.train, task), steps, seed + 1 + i, save)
    return tasks
