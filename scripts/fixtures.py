"""Tiny real checkpoints, built offline with transformers, for the demo, tests and benchmarks.

``python -m scripts.fixtures OUT`` writes a base, three experts and a recipe into OUT.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

VOCAB = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(61)]]


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 3-layer Llama of a few hundred thousand parameters."""
    options: dict[str, object] = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    options.update(overrides)
    return LlamaConfig(**options)


def save_tokenizer(folder: Path) -> None:
    """A real word-level fast tokenizer over the tiny vocabulary."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    fast.save_pretrained(folder)


def save_model(
    model: torch.nn.Module, folder: Path, dtype: torch.dtype, shard_size: str = "40KB"
) -> Path:
    """save_pretrained in several safetensors shards, in ``dtype``, with a tokenizer."""
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    save_tokenizer(folder)
    return folder


def make_base(
    folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **config: object
) -> Path:
    """A randomly initialised tiny Llama saved as a sharded checkpoint."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    return save_model(model, folder, dtype)


def make_expert(
    base: Path, folder: Path, seed: int, scale: float = 0.02, dtype: torch.dtype | None = None
) -> Path:
    """The base plus a seeded, partly sparse random task vector (a stand-in fine-tune)."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    stored = dtype or LlamaForCausalLM.from_pretrained(base).dtype
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen) * scale
            keep = torch.rand(param.shape, generator=gen) < 0.7
            param.add_(noise * keep)
    return save_model(model, folder, stored)


def make_adapter(
    base: Path,
    folder: Path,
    config: PeftConfig,
    seed: int,
    scale: float = 0.1,
    model_class: type = LlamaForCausalLM,
) -> Path:
    """A PEFT adapter of ``base`` with seeded random adapter weights (a stand-in for training).

    LoRA B starts at zero and (IA)³ vectors at one in peft; both are moved off their
    initialisation so that the adapter changes the model.
    """
    config = copy.deepcopy(config)  # peft records the base in the config it is given
    model = get_peft_model(model_class.from_pretrained(base, dtype=torch.float32), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(folder, save_embedding_layers=False)  # the base's are unchanged
    return folder


def make_demo(out: Path, experts: int = 3, dtype: torch.dtype = torch.float32) -> Path:
    """Base, experts and a TIES recipe in ``out``; returns the recipe path."""
    out.mkdir(parents=True, exist_ok=True)
    base = make_base(out / "base", dtype=dtype)
    names = ["math", "code", "chat", "law", "bio", "poetry", "news", "legal"][:experts]
    for i, name in enumerate(names):
        make_expert(base, out / "experts" / name, seed=100 + i)
    models = "\n".join(
        f"  - model: experts/{name}\n    parameters: {{weight: 1.0, density: {0.2 + 0.1 * i:.1f}}}"
        for i, name in enumerate(names)
    )
    recipe = out / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        f"{models}\nparameters: {{lambda: 1.0}}\ndtype: float32\nseed: 0\noutput: merged\n"
    )
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    recipe = make_demo(args.out, args.experts, getattr(torch, args.dtype))
    print(recipe)


if __name__ == "__main__":
    main()
