"""The output tokenizer of a merge and each input's vocabulary, as mergekit 0.1.5 builds them
(``tokenizer_source`` / ``tokenizer.source``): the base's tokenizer, a model folder's, or the
union of every input's.

The union is the base's tokenizer (the first expert's without a base), cut to the rows of its
embedding, plus every other input's ordinary tokens it lacks, then every input's added tokens
(the first input's settings where two differ), each appended with ``add_tokens``. mergekit walks
the inputs in a set's order and each vocabulary in a hash map's order, so its new tokens' ids
vary from run to run; mergecli's convention: the base, then the experts in recipe order, each
vocabulary by id. Tokens listed under ``tokenizer.tokens`` are appended last, as in mergekit.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.errors import SourceError


@dataclass
class InputVocab:
    """One input's tokens: ``rows`` those below its embedding's row count ``size`` (the ones a
    permutation may take), ``everything`` its tokenizer's whole vocabulary (a ``model_token``
    source's lookup)."""

    label: str
    size: int
    rows: dict[str, int]
    everything: dict[str, int]


def load_tokenizer(folder: Path, label: str) -> Any:
    """A folder's tokenizer (transformers' AutoTokenizer, never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many error types here
        raise SourceError(
            f"{label}: cannot load the tokenizer in '{folder}': {exc}".splitlines()[0], path=folder
        ) from None


def input_vocab(tokenizer: Any, size: int | None, label: str) -> InputVocab:
    """The vocabulary of an input whose embedding has ``size`` rows (its config's vocab_size;
    the tokenizer's length when unknown)."""
    everything = dict(tokenizer.get_vocab())
    size = len(everything) if size is None else size
    rows = {tok: i for tok, i in sorted(everything.items(), key=lambda kv: kv[1]) if i < size}
    return InputVocab(label, size, rows, everything)


def cut_tokenizer(folder: Path, size: int | None, label: str) -> Any:
    """The folder's tokenizer without the tokens whose id is ``size`` or more (mergekit's
    stripped base: no row of the embedding holds them), reloaded from a private copy."""
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(folder, label)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if size is not None and any(i >= size for i in tokenizer.get_vocab().values()):
            _cut_file(Path(tmp) / "tokenizer.json", size, label, folder)
        return AutoTokenizer.from_pretrained(tmp)


def _cut_file(file: Path, size: int, label: str, folder: Path) -> None:
    """Drop ids ``size`` and above from a tokenizer.json (vocabulary, added tokens, merges)."""
    data = json.loads(file.read_text()) if file.is_file() else None
    vocab = data["model"].get("vocab") if data else None
    if not isinstance(vocab, dict):
        raise SourceError(
            f"{label}: its tokenizer in '{folder}' has tokens beyond its {size} embedding rows "
            "and no vocabulary mapping to cut them from (as mergekit, only BPE, WordPiece and "
            "WordLevel tokenizers can be cut)",
            path=folder,
        )
    assert data is not None
    dropped = {tok for tok, i in vocab.items() if i >= size}
    dropped |= {e["content"] for e in data["added_tokens"] if e["id"] >= size}
    data["model"]["vocab"] = {tok: i for tok, i in vocab.items() if i < size}
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    if "merges" in data["model"]:
        data["model"]["merges"] = [
            m
            for m in data["model"]["merges"]
            if not set(m.split(" ") if isinstance(m, str) else m) & dropped
        ]
    file.write_text(json.dumps(data))


def union_tokenizer(base: Any, inputs: list[tuple[Any, InputVocab]]) -> Any:
    """``base`` (the cut base tokenizer, changed in place) with every input's tokens appended:
    first the ordinary tokens it lacks, then the added tokens (the first input's settings)."""
    added: dict[str, Any] = {}
    ordinary: dict[str, None] = {}
    for tokenizer, vocab in inputs:
        decoder = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < vocab.size}
        contents = {t.content for t in decoder.values()}
        ordinary.update({tok: None for tok in vocab.rows if tok not in contents})
        for _, token in sorted(decoder.items()):
            added.setdefault(token.content, token)
    have = base.get_vocab()
    for tok in ordinary:
        if tok not in added and tok not in have:
            base.add_tokens(tok)
    for token in added.values():
        base.add_tokens(token)
    return base


def output_ids(tokenizer: Any, label: str) -> list[str]:
    """The output tokenizer's tokens by id; its ids must be 0 .. n−1 (one embedding row each)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise SourceError(f"{label}: the output tokenizer's ids are not 0 .. {len(tokens) - 1}")
    return tokens
