"""Merges over a new vocabulary (mergekit's tokenizer_source: union and tokenizer: section):
tiny Llama models whose word-level tokenizers share some tokens and differ in others. The
output vocabulary is checked against a union computed here, every embedding and head row
against mergekit's rule written out here per token, and the output loads and runs in
transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import mergecli
from mergecli.errors import RecipeError
from mergecli.recipe import recipe_from_dict
from scripts.fixtures import tiny_llama_config
from tests.helpers import load_state, run_cli, write_recipe

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(10)]
CHAT = ["<|im_start|>", "<|im_end|>"]
VOCABS = {  # ordinary tokens in id order, added tokens, rows of the embedding
    "base": (SPECIAL + WORDS, [], 13),
    "chat": (SPECIAL + WORDS + ["y0"], CHAT, 16),
    "extra": (
        [*SPECIAL, "x0", "w9", "x1", "w8", "y0", "x2", "w7", "x3", "w6", "x4", "w5"],
        ["<pad0>"],  # id 14: beyond its 14 embedding rows, so in no output
        14,
    ),
}
NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def save_tiny(folder: Path, name: str, seed: int) -> Path:
    """A 1-layer Llama with ``name``'s vocabulary and its word-level fast tokenizer."""
    ordinary, added, rows = VOCABS[name]
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=rows, num_hidden_layers=1, hidden_size=16)
    LlamaForCausalLM(config).save_pretrained(folder)
    word = Tokenizer(models.WordLevel({t: i for i, t in enumerate(ordinary)}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_tokens(added, special_tokens=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vocab_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab_zoo")
    for seed, name in enumerate(VOCABS):
        save_tiny(root / name, name, seed)
    return root


def union_tokens() -> list[str]:
    """mergecli's union: the base's tokens, the others' new ordinary tokens (inputs in recipe
    order, each by id), then the added tokens; <pad0> lies beyond its model's rows."""
    out = list(VOCABS["base"][0])
    for name in ("chat", "extra"):
        out += [t for t in VOCABS[name][0] if t not in out]
    return out + CHAT


def stored(zoo: Path) -> dict[str, tuple[dict[str, int], dict[str, torch.Tensor]]]:
    """Each input's token → row (rows below its size) and its tensors."""
    out = {}
    for name, (ordinary, added, rows) in VOCABS.items():
        ids = {t: i for i, t in enumerate(ordinary + added) if i < rows}
        out[name] = (ids, load_state(zoo / name))
    return out


def expected_rows(
    zoo: Path, tokens: list[str], tensor: str, configured: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Each input's tensor over ``tokens`` by mergekit's rule, token by token (float64): its
    own row; else the configured source; else the one input's row that has it, the base's, or
    the mean of those that have it; zeros where none has it."""
    inputs = stored(zoo)
    configured = configured or {}
    out = {}
    for name, (ids, state) in inputs.items():
        rows = []
        for token in tokens:
            having = [n for n, (v, _) in inputs.items() if token in v]
            rule = configured.get(token, {})
            source = rule.get("source")
            if token in ids and not rule.get("force"):
                row = state[tensor][ids[token]].double()
            elif source == "zero":
                row = torch.zeros(16, dtype=torch.float64)
            elif isinstance(source, tuple):  # (model, its token)
                model, other = source
                row = inputs[model][1][tensor][inputs[model][0][other]].double()
            elif isinstance(source, str):
                row = inputs[source][1][tensor][inputs[source][0][token]].double()
            elif len(having) == 1:
                row = inputs[having[0]][1][tensor][inputs[having[0]][0][token]].double()
            elif not having:
                row = torch.zeros(16, dtype=torch.float64)
            elif "base" in having:
                row = inputs["base"][1][tensor][inputs["base"][0][token]].double()
            else:
                row = torch.stack([inputs[n][1][tensor][inputs[n][0][token]] for n in having])
                row = row.double().mean(0)
            rows.append(row)
        out[name] = torch.stack(rows)
    return out


def recipe(zoo: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "chat"), "parameters": {"weight": 0.7}},
            {"model": str(zoo / "extra"), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
        "output": str(out),
        **extra,
    }


def task_arithmetic(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    base = rows["base"]
    return base + 0.7 * (rows["chat"] - base) + 0.4 * (rows["extra"] - base)


@pytest.mark.slow
def test_union_vocabulary_rows_and_forward_pass(vocab_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_recipe(tmp_path, recipe(vocab_zoo, out, tokenizer_source="union"))
    result = run_cli("merge", path, "--quiet")
    assert result.exit_code == 0, result.output
    tokens = union_tokens()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == tokens
    assert len(tokenizer.get_vocab()) == len(tokens) == 21
    assert {t.content for t in tokenizer.added_tokens_decoder.values()} >= set(CHAT)
    state = load_state(out)
    for name in NAMES:
        want = task_arithmetic(expected_rows(vocab_zoo, tokens, name))
        torch.testing.assert_close(state[name].double(), want, atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 21
    batch = tokenizer("<s> w1 x0 y0 <|im_start|> w9", return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [1, 4, 14, 13, 19, 12]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 6, 21) and bool(torch.isfinite(logits).all())


TOKENS = {  # the tokenizer: section's entries and the rule each means in expected_rows
    "w6": ({"source": "EXTRA", "force": True}, {"source": "extra", "force": True}),
    "x0": (
        {"source": {"kind": "model_token", "model": "CHAT", "token": "w2"}},
        {"source": ("chat", "w2")},
    ),
    "w3": ({"source": {"kind": "zero"}, "force": True}, {"source": "zero", "force": True}),
    "w4": (
        {"source": {"kind": "model_token", "model": "BASE", "token_id": 0}},
        {"source": ("base", "<unk>")},
    ),
    "<new>": ({}, {}),
}


def section_tokens(zoo: Path) -> dict[str, Any]:
    names = {"EXTRA": "extra", "CHAT": "chat", "BASE": "base"}

    def place(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        return str(zoo / names[value]) if value in names else value

    return {token: place(entry) for token, (entry, _) in TOKENS.items()}


@pytest.mark.slow
def test_tokenizer_section_token_sources_and_padding(vocab_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    section = {"source": "union", "tokens": section_tokens(vocab_zoo), "pad_to_multiple_of": 8}
    data = recipe(vocab_zoo, out, tokenizer=section)
    plan = mergecli.plan_merge(recipe_from_dict(data))
    assert any("1 tokens of the output vocabulary are in no input" in w for w in plan.warnings)
    mergecli.run_merge(plan, out)
    tokens = [*union_tokens(), "<new>"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == tokens
    state = load_state(out)
    rules = {token: rule for token, (_, rule) in TOKENS.items()}
    for name in NAMES:
        rows = expected_rows(vocab_zoo, tokens, name, rules)
        rows = {k: torch.cat([v, v.mean(0).expand(2, -1)]) for k, v in rows.items()}  # 22 → 24
        torch.testing.assert_close(state[name].double(), task_arithmetic(rows), atol=1e-6, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 24


def test_remapped_rows_stream_in_pieces(
    vocab_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of rows a:b equals those rows of the whole remapped tensor and reads stored rows
    in slices (never a whole tensor); here blocks of 3 rows, a slice per run of rows."""
    monkeypatch.setattr("mergecli.vocab.rows.BLOCK_ELEMENTS", 3 * 16)
    monkeypatch.setattr("mergecli.vocab.rows.GAP", 0)
    data = recipe(vocab_zoo, tmp_path / "out", tokenizer_source="union")
    plan = mergecli.plan_merge(recipe_from_dict(data))
    assert plan.vocabulary is not None and plan.vocabulary.rows == 21
    assert plan.summary()["vocabulary"] == {"tokens": 21, "rows": 21}
    expert = plan.experts[1]
    assert expert.info(NAMES[0]).shape == (21, 16)
    whole = expert.read(NAMES[0])
    want = expected_rows(vocab_zoo, union_tokens(), NAMES[0])["extra"]
    torch.testing.assert_close(whole.double(), want, atol=1e-7, rtol=0)
    for a, b in ((0, 5), (5, 13), (13, 21), (18, 19)):
        assert torch.equal(expert.read(NAMES[0], (a, b)), whole[a:b])
    reads: list[tuple[str, Any]] = []
    for source in (plan.base, expert):
        assert source is not None

        def counted(name: str, rows: Any = None, read: Any = source.read_stored) -> Any:
            reads.append((read.__self__.label, rows))
            return read(name, rows)

        source.read_stored = counted  # type: ignore[method-assign]
    expert.read(NAMES[0], (18, 19))  # x4: the expert's own row 12, alone
    assert reads == [("models[1].model", (12, 13))]
    reads.clear()
    expert.read(NAMES[0], (3, 6))  # w0..w2: the base's rows 3, 4, 5 (a run), none of its own
    assert reads == [("base_model", (3, 6))]


def test_bad_token_sources_are_one_line_recipe_errors(vocab_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    chat = str(vocab_zoo / "chat")

    def plan(tokens: dict[str, Any]) -> None:
        data = recipe(vocab_zoo, out, tokenizer={"source": "union", "tokens": tokens})
        mergecli.plan_merge(recipe_from_dict(data))

    cases = [
        ({"w1": {"source": str(tmp_path)}}, "tokenizer.tokens.w1.source", "not a model"),
        ({"x0": {"source": chat}}, "tokenizer.tokens.x0.source", "'x0' is not in"),
        (
            {"w1": {"source": {"kind": "model_token", "model": chat, "token": "zz"}}},
            "tokenizer.tokens.w1.source.token",
            "'zz' is not in",
        ),
        (
            {"w1": {"source": {"kind": "model_token", "model": chat, "token_id": 16}}},
            "tokenizer.tokens.w1.source.token_id",
            "outside",
        ),
        (
            {"w1": {"source": {"kind": "model_token", "model": chat}}},
            "tokenizer.tokens.w1.source",
            "exactly one",
        ),
        (
            {"w1": {"source": {"kind": "zero", "token": "w2"}}},
            "tokenizer.tokens.w1.source",
            "takes no 'token'",
        ),
    ]
    for tokens, key, message in cases:
        with pytest.raises(RecipeError, match=message) as info:
            plan(tokens)
        assert info.value.key == key and "\n" not in str(info.value)
    data = recipe(vocab_zoo, out, tokenizer_source="union")
    with pytest.raises(RecipeError, match="not both"):
        recipe_from_dict({**data, "tokenizer": {"source": "union"}})
    with pytest.raises(RecipeError, match="neither 'base', 'union'") as info:
        recipe_from_dict({**data, "tokenizer_source": "unoin"})
    assert info.value.key == "tokenizer_source"
    path = write_recipe(tmp_path, recipe(vocab_zoo, out, tokenizer={"tokens": cases[1][0]}))
    result = run_cli("merge", path, "--dry-run")
    assert result.exit_code == 2 and "tokenizer.tokens.x0.source" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_same_sized_inputs_with_tokenizer_source_base_copy_the_files(
    zoo: Path, tmp_path: Path
) -> None:
    data = {
        "merge_method": "linear",
        "models": [{"model": str(zoo / "math")}, {"model": str(zoo / "code")}],
        "tokenizer_source": "base",
    }
    assert mergecli.plan_merge(recipe_from_dict(data)).vocabulary is None


@pytest.mark.slow
def test_scoring_a_union_merge_uses_its_tokenizer(vocab_zoo: Path, tmp_path: Path) -> None:
    """A merge over a new vocabulary is scored from its folder, with the union tokenizer: the
    same loss as the written merge's, which the base's tokenizer would not give (x0, y0)."""
    from mergecli.evaluate import Scorer

    (tmp_path / "text.txt").write_text("w1 x0 y0 w2\nx3 x4 <|im_start|> w9\n")
    evaluate = {"metric": "loss", "data": str(tmp_path / "text.txt")}
    data = recipe(vocab_zoo, tmp_path / "out", tokenizer_source="union", evaluate=evaluate)
    spec = recipe_from_dict(data)
    written = mergecli.run_merge(mergecli.plan_merge(spec), tmp_path / "out").output
    scorer = Scorer(spec)
    assert scorer.merge(spec).score == pytest.approx(scorer.model(written).score, rel=1e-6)
    base_tokens = AutoTokenizer.from_pretrained(vocab_zoo / "base")("w1 x0 y0 w2")["input_ids"]
    assert base_tokens[1] == 0  # the base's tokenizer knows no x0


def test_moe_refuses_a_new_vocabulary(vocab_zoo: Path, tmp_path: Path) -> None:
    from mergecli.moe import plan_moe

    data = recipe(vocab_zoo, tmp_path / "out", tokenizer_source="union", moe={})
    del data["merge_method"]
    with pytest.raises(RecipeError, match="MoE keeps its base's vocabulary") as info:
        plan_moe(recipe_from_dict(data))
    assert info.value.key == "tokenizer_source"
