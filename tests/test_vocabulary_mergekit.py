"""mergekit 0.1.5's tokenizer tests (tests/test_tokenizer.py), their facts on mergecli: a base
of 64 BPE tokens, a ChatML model with 2 added tokens (66 rows) and a model whose tokenizer has 4
added tokens beyond its 64 rows; the same vocabulary sizes, added-token counts and rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, LlamaTokenizerFast

import mergecli
from mergecli.recipe import recipe_from_dict
from scripts.fixtures import tiny_llama_config
from tests.helpers import load_state

EMBED = "model.embed_tokens.weight"


def bpe_model(folder: Path, rows: int, added: list[str], seed: int) -> Path:
    """A tiny Llama of ``rows`` embedding rows and a 64-token BPE tokenizer plus ``added``."""
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=rows, num_hidden_layers=1, hidden_size=16)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokens = ["<unk>", "<s>", "</s>", *[f"_tok_{i}" for i in range(3, 64)]]
    model = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}
    data = {"version": "1.0", "model": model, "added_tokens": []}
    Tokenizer.from_str(json.dumps(data)).save(str(folder / "bpe.json"))
    tokenizer = LlamaTokenizerFast(tokenizer_file=str(folder / "bpe.json"))
    (folder / "bpe.json").unlink()
    tokenizer.add_tokens(added)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_tokenizer")
    bpe_model(root / "base", 64, [], 0)
    bpe_model(root / "chatml", 66, ["<|im_start|>", "<|im_end|>"], 1)
    bpe_model(root / "padded", 64, [f"<UNUSED_{i}>" for i in range(4)], 2)
    return root


def merge(kit: Path, out: Path, names: list[str], base: str = "base", **extra: Any) -> Path:
    data = {
        "merge_method": "linear",
        "base_model": str(kit / base),
        "models": [{"model": str(kit / n), "parameters": {"weight": 1.0}} for n in names],
        "dtype": "float32",
        **extra,
    }
    mergecli.run_merge(mergecli.plan_merge(recipe_from_dict(data)), out)
    return out


def row(folder: Path, token: str) -> torch.Tensor:
    return load_state(folder)[EMBED][AutoTokenizer.from_pretrained(folder).get_vocab()[token]]


@pytest.mark.slow
def test_mergekit_tokenizer_sources(kit: Path, tmp_path: Path) -> None:
    everything = ["base", "padded", "chatml"]
    out = merge(kit, tmp_path / "base", everything, tokenizer_source="base")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer.get_vocab()) == 64 and len(tokenizer.added_tokens_decoder) == 3
    assert load_state(out)[EMBED].shape == (64, 16)

    out = merge(kit, tmp_path / "union", everything, tokenizer_source="union")
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 66 and len(AutoTokenizer.from_pretrained(out).added_tokens_decoder) == 5
    assert {"<|im_start|>", "<|im_end|>"} <= set(vocab)
    assert not {f"<UNUSED_{i}>" for i in range(4)} & set(vocab)
    for token in ("<|im_start|>", "<|im_end|>"):
        torch.testing.assert_close(row(out, token), row(kit / "chatml", token))

    out = merge(kit, tmp_path / "model", everything, tokenizer_source=str(kit / "chatml"))
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 66 and {"<|im_start|>", "<|im_end|>"} <= set(vocab)

    # a base whose tokenizer outgrows its rows is cut to them (mergekit's stripped base)
    out = merge(kit, tmp_path / "cut", ["chatml"], base="padded", tokenizer_source="base")
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert sorted(vocab.values()) == list(range(64)) and "<UNUSED_0>" not in vocab


@pytest.mark.slow
def test_mergekit_token_sources_and_padding(kit: Path, tmp_path: Path) -> None:
    chatml, base = str(kit / "chatml"), str(kit / "base")
    tokens = {
        "_tok_10": {"source": chatml, "force": True},
        "_tok_11": {"source": base, "force": True},
    }
    section = {"source": "union", "tokens": tokens}
    out = merge(kit, tmp_path / "force", ["base", "chatml"], tokenizer=section)
    assert len(AutoTokenizer.from_pretrained(out).get_vocab()) == 66
    torch.testing.assert_close(row(out, "_tok_10"), row(kit / "chatml", "_tok_10"))
    torch.testing.assert_close(row(out, "_tok_11"), row(kit / "base", "_tok_11"))

    by_id = {"kind": "model_token", "model": chatml, "token_id": 64}
    by_token = {"kind": "model_token", "model": base, "token": "<s>"}
    tokens = {
        "_tok_20": {"source": by_id, "force": True},
        "_tok_21": {"source": by_token, "force": True},
    }
    section = {"source": "base", "tokens": tokens}
    out = merge(kit, tmp_path / "ids", ["base", "chatml"], tokenizer=section)
    assert len(AutoTokenizer.from_pretrained(out).get_vocab()) == 64
    torch.testing.assert_close(row(out, "_tok_20"), load_state(kit / "chatml")[EMBED][64])
    torch.testing.assert_close(row(out, "_tok_21"), row(kit / "base", "<s>"))

    section = {"source": "base", "pad_to_multiple_of": 16}
    out = merge(kit, tmp_path / "pad", ["chatml"], base="chatml", tokenizer=section)
    assert AutoConfig.from_pretrained(out).vocab_size == 80
    assert len(AutoTokenizer.from_pretrained(out).get_vocab()) == 66
    assert load_state(out)[EMBED].shape == (80, 16)
