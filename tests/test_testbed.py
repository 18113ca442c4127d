"""The real testbed (scripts/testbed): layout, loading with transformers, expert quality, data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from scripts.testbed import build
from scripts.testbed.data import TRANSFORMS, examples, load_digits, read_jsonl, split_indices
from scripts.testbed.figures import BEGIN, END, flex_table, write_doc
from scripts.testbed.train import train_expert

pytestmark = pytest.mark.slow  # builds and trains the real testbed


def manifest(testbed: Path) -> dict:
    return json.loads((testbed / "testbed.json").read_text())


@torch.no_grad()
def test_accuracy(model_dir: Path, data: Path) -> float:
    """Accuracy of a checkpoint on a JSONL file, with the Auto classes only."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    records = read_jsonl(data)
    batch = tokenizer([r["text"] for r in records], padding=True, return_tensors="pt")
    predicted = model(**batch).logits.argmax(-1)
    return float((predicted == torch.tensor([r["label"] for r in records])).float().mean())


test_accuracy.__test__ = False  # a helper, not a test


def test_layout_matches_contract(testbed: Path) -> None:
    info = manifest(testbed)
    tasks = info["tasks"]
    assert len(tasks) >= 6
    assert sorted(p.name for p in (testbed / "runs").iterdir()) == sorted(tasks)
    for folder in [testbed / "base", *(testbed / "experts" / t for t in tasks)]:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (folder / name).is_file(), folder / name
    for task in tasks:
        steps = sorted(
            int(p.name.removeprefix("checkpoint-")) for p in (testbed / "runs" / task).iterdir()
        )
        assert len(steps) >= 4
        assert steps == info["runs"][task]["steps"]
        best = info["runs"][task]["best_step"]
        run_validation = {int(k): v for k, v in info["runs"][task]["validation"].items()}
        assert best == max(steps, key=lambda s: (run_validation[s], -s))
        chosen = testbed / "runs" / task / f"checkpoint-{best}" / "model.safetensors"
        expert = testbed / "experts" / task / "model.safetensors"
        assert chosen.read_bytes() == expert.read_bytes()
        for part in ("train", "validation", "test"):
            records = read_jsonl(testbed / info["data"][task][part])
            assert records
            assert all(set(r) == {"text", "label"} and 0 <= r["label"] < 10 for r in records)


def test_loads_with_auto_classes_and_manifest_is_truthful(testbed: Path) -> None:
    info = manifest(testbed)
    task = info["tasks"][0]
    expert = testbed / "experts" / task
    tokenizer = AutoTokenizer.from_pretrained(expert)
    text = read_jsonl(testbed / "data" / task / "test.jsonl")[0]["text"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert len(ids) == len(text.split()) + 2 and tokenizer.unk_token_id not in ids
    measured = test_accuracy(expert, testbed / "data" / task / "test.jsonl")
    assert measured == pytest.approx(info["test_accuracy"]["experts"][task], abs=1e-6)


def test_experts_beat_base_and_task_arithmetic_lies_between(testbed: Path) -> None:
    info = manifest(testbed)
    for task in info["tasks"]:
        data = testbed / "data" / task / "test.jsonl"
        expert = test_accuracy(testbed / "experts" / task, data)
        base = test_accuracy(testbed / "base", data)
        assert expert > base + 0.15, (task, base, expert)
    average = info["average_test_accuracy"]
    assert average["base"] < average["task_arithmetic"] < average["experts"]


def test_data_split_is_deterministic_and_disjoint(testbed: Path) -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and set(labels.tolist()) == set(range(10))
    first, again, other = (split_indices(len(labels), s) for s in (0, 0, 1))
    for name in ("train", "validation", "test"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.test, other.test)
    parts = [set(first.train), set(first.validation), set(first.test)]
    assert sum(map(len, parts)) == len(labels) == len(set.union(*parts))
    # the built files hold exactly the seeded split, transformed per task
    info = manifest(testbed)
    held = split_indices(
        len(labels),
        info["seed"],
        held_out=len(read_jsonl(testbed / "data" / info["tasks"][0] / "test.jsonl")),
    )
    for task in info["tasks"]:
        expected = examples(images[held.test], labels[held.test], task)
        assert read_jsonl(testbed / "data" / task / "test.jsonl") == expected


def test_tasks_present_the_same_digit_differently() -> None:
    images, labels = load_digits()
    texts = {examples(images[:1], labels[:1], task)[0]["text"] for task in TRANSFORMS}
    assert len(texts) == len(TRANSFORMS)
    blank = examples(np.zeros((1, 8, 8), dtype=np.int64), np.zeros(1, dtype=np.int64), None)
    assert blank[0]["text"] == " ".join(["0000"] * 16)


def test_refuses_a_folder_that_is_not_empty(testbed: Path) -> None:
    with pytest.raises(SystemExit, match="is not empty"):
        build(testbed, reduced=True)


def test_figure_tables_report_the_gain_and_replace_only_the_marked_section(tmp_path: Path) -> None:
    flex = {
        "lambda": 1.6,
        "sizes": [
            {"target": 1.0, "size": 1.0, "score": 0.3},
            {"target": 1.5, "size": 1.5, "score": 0.4},
            {"target": 2.0, "size": 1.9, "score": 0.5},
        ],
        "gain_1x_2x": 0.2,
        "expert_score": 0.8,
    }
    table = flex_table(flex)
    assert table[0] == "| deployed size (models) | 1.00× | 1.50× | 1.90× |"
    assert table[2] == "| average test accuracy (%) | 30.0 | 40.0 | 50.0 |"
    assert "gains **+20.0 points** from 1× to 2× (1.90× reached; experts: 80.0 %)" in table[-1]
    doc = tmp_path / "testbed.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    write_doc(doc, "new")
    assert doc.read_text() == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"


def test_train_from_the_base_reproduces_the_expert(testbed: Path, tmp_path: Path) -> None:
    """``python -m scripts.testbed train`` (TIME's train command) from the base is the build's
    own fine-tuning: the same weights and training arguments as ``experts/<task>``."""
    task = manifest(testbed)["tasks"][1]
    out = train_expert(testbed, task, testbed / "base", tmp_path / "expert")
    want, got = (load_file(f / "model.safetensors") for f in (testbed / "experts" / task, out))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    args = (
        json.loads((f / "training_args.json").read_text())
        for f in (testbed / "experts" / task, out)
    )
    assert next(args) == next(args)
