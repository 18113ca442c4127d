"""A merge over a new vocabulary (mergekit's ``tokenizer_source: union`` and ``tokenizer:``
section): the output tokenizer, each input's permutation, and every input's vocabulary tensors
remapped row by row (``Checkpoint.remap``) before any method sees them.

``tokenizer_source: base`` or a folder with inputs whose embeddings all have the same number of
rows copies the tokenizer files as they are (the inputs are taken to share the vocabulary);
inputs of different sizes, ``union`` and the ``tokenizer:`` section build the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.errors import RecipeError, SourceError
from mergecli.recipe import Recipe, TokenEmbedding, TokenSource
from mergecli.sources import Checkpoint, Source
from mergecli.vocab.rows import ZERO, RowMap, TokenDefault
from mergecli.vocab.tokenizers import (
    InputVocab,
    cut_tokenizer,
    input_vocab,
    load_tokenizer,
    output_ids,
    union_tokenizer,
)

VOCAB_TENSORS = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)
"""Name endings of the tensors with one row per token (input embeddings, output heads)."""
TOKENIZER_MARKS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Vocabulary:
    """The output's tokenizer and its embedding rows (``rows`` ≥ ``len(tokens)`` when padded)."""

    tokenizer: Any
    tokens: list[str]
    rows: int
    tensors: list[str]
    """The remapped tensors."""

    def save(self, folder: Path) -> None:
        """Write the tokenizer files (transformers' save_pretrained) into ``folder``."""
        self.tokenizer.save_pretrained(folder)


def plan_vocabulary(
    recipe: Recipe, base: Checkpoint | None, experts: list[Source], notes: list[str]
) -> Vocabulary | None:
    """Build the recipe's output vocabulary and remap the inputs' vocabulary tensors onto it;
    None when the tokenizer is copied (no ``tokenizer:`` section and no ``union``, inputs of
    one size)."""
    section = recipe.tokenizer
    source = section.source if section else recipe.tokenizer_source
    key = "tokenizer.source" if section else "tokenizer_source"
    if source is None:
        return None
    sources: list[Source] = [s for s in (base, *experts) if s is not None]
    sizes = {s.path: embedding_rows(s) for s in sources}
    if section is None and source != "union" and len(set(sizes.values())) == 1:
        return None
    for i, expert in enumerate(experts):
        if not isinstance(expert, Checkpoint) or expert.delta:
            raise RecipeError(
                f"{key}: a new vocabulary needs full checkpoints; models[{i}] is an adapter",
                key=key,
            )
    checkpoints = [s for s in sources if isinstance(s, Checkpoint)]
    paths = list(dict.fromkeys(s.path for s in checkpoints))  # one input per folder
    index = {id(s): paths.index(s.path) for s in checkpoints}
    first = checkpoints[0]
    out_base = cut_tokenizer(first.path, sizes[first.path], first.label)
    vocabs: list[InputVocab] = []
    tokenizers: list[Any] = []
    for path in paths:
        label = next(s.label for s in checkpoints if s.path == path)
        if path == first.path:
            tokenizer = out_base
        elif any((path / mark).is_file() for mark in TOKENIZER_MARKS):
            tokenizer = load_tokenizer(path, label)
        else:
            notes.append(f"{label}: no tokenizer in '{path}'; taken to be the base's (mergekit)")
            tokenizer = out_base
        tokenizers.append(tokenizer)
        vocabs.append(input_vocab(tokenizer, sizes[path], label))
    if source == "union":
        output = union_tokenizer(out_base, list(zip(tokenizers, vocabs, strict=True)))
    elif source == "base":
        output = out_base
    else:
        output = load_tokenizer(recipe.resolve_path(source), key)
    entries = section.tokens or {} if section else {}
    for token in entries:
        output.add_tokens(token)
    tokens = output_ids(output, key)
    perms = np.array([[v.rows.get(t, -1) for t in tokens] for v in vocabs], dtype=np.int64)
    ids = {t: i for i, t in enumerate(tokens)}
    configured = {
        ids[token]: token_default(
            recipe, token, ids[token], entry, perms, vocabs, index, base, experts
        )
        for token, entry in entries.items()
    }
    multiple = section.pad_to_multiple_of if section else None
    rows = -(-len(tokens) // multiple) * multiple if multiple else len(tokens)
    base_input = index[id(base)] if base is not None else None
    names = sorted({n for s in checkpoints for n in s.tensor_names() if is_vocab_tensor(n)})
    absent = 0
    for name in names:
        holders = sorted({index[id(s)] for s in checkpoints if name in s})
        for s in checkpoints:
            if name in s and s.stored_info(name).shape[0] != sizes[s.path]:
                raise SourceError(
                    f"{s.label}: '{name}' has {s.stored_info(name).shape[0]} rows, but its "
                    f"config's vocab_size is {sizes[s.path]}",
                    path=s.path,
                )
        width = next(s.stored_info(name).shape[1:] for s in checkpoints if name in s)
        rowmap = RowMap(perms, holders, base_input, configured, rows, width)
        absent = max(absent, rowmap.absent)
        remap(name, rowmap, [s for s in checkpoints if name in s], index, paths)
    if absent:
        notes.append(f"{absent} tokens of the output vocabulary are in no input: their rows are 0")
    return Vocabulary(output, tokens, rows, names)


def remap(
    name: str,
    rowmap: RowMap,
    holding: list[Checkpoint],
    index: dict[int, int],
    paths: list[Path],
) -> None:
    """Show ``name`` over the new vocabulary in every checkpoint holding it."""
    by_input = {index[id(s)]: s for s in holding}

    def reader(k: int, start: int, stop: int) -> torch.Tensor:
        return by_input[k].read_stored(name, (start, stop))

    for s in holding:
        s.remap(
            name,
            rowmap.rows,
            partial(rowmap.read, index[id(s)], reader=reader, dtype=s.stored_info(name).dtype),
        )


def token_default(
    recipe: Recipe,
    token: str,
    token_id: int,
    entry: TokenEmbedding,
    perms: np.ndarray,
    vocabs: list[InputVocab],
    index: dict[int, int],
    base: Checkpoint | None,
    experts: list[Source],
) -> TokenDefault:
    """The default row of one ``tokenizer.tokens`` entry; a model that lacks the token, or a
    ``model_token`` outside its model's vocabulary, is a RecipeError naming the key."""
    key = f"tokenizer.tokens.{token}.source"
    value = entry.source
    if value is None:
        return TokenDefault(None, -1, entry.force)
    if isinstance(value, TokenSource) and value.kind == "zero":
        return TokenDefault(ZERO, -1, entry.force)
    named = value if isinstance(value, str) else str(value.model)
    found = recipe.find_model(named)
    model = base if found == -1 else experts[found] if found is not None else None
    if model is None:
        raise RecipeError(f"{key}: '{named}' is not a model of this merge", key=key)
    k = index[id(model)]
    vocab = vocabs[k]
    if isinstance(value, str):
        row = int(perms[k, token_id])
        if row < 0:
            raise RecipeError(f"{key}: '{token}' is not in {vocab.label}'s vocabulary", key=key)
        return TokenDefault(k, row, entry.force)
    if value.token is not None and value.token not in vocab.everything:
        raise RecipeError(
            f"{key}.token: '{value.token}' is not in {vocab.label}'s vocabulary",
            key=f"{key}.token",
        )
    row = value.token_id if value.token_id is not None else vocab.everything[str(value.token)]
    if not 0 <= row < vocab.size:
        raise RecipeError(
            f"{key}: token id {row} is outside {vocab.label}'s {vocab.size} embedding rows",
            key=f"{key}.token_id" if value.token_id is not None else f"{key}.token",
        )
    return TokenDefault(k, row, entry.force)


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


def embedding_rows(source: Source) -> int | None:
    """The rows of a model's embedding: its config's vocab_size (or text_config's), else its
    first vocabulary tensor's; None when it has neither."""
    config = source.config() or {}
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if size:
        return int(size)
    held = [n for n in source.tensor_names() if is_vocab_tensor(n)]
    return source.info(held[0]).shape[0] if held else None
