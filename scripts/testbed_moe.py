"""Arrow MoE against expert training duration on the testbed, beside task arithmetic and TIES.

``python -m scripts.testbed_moe [--out .bench/testbed-moe] [--steps 120] [--every 30]``

Builds the reduced testbed (docs/testbed.md), fine-tunes one LoRA adapter per task from its base
(rank 4 on the attention's query and value, the base's trained head kept; a checkpoint every
``--every`` steps), then runs ``mergecli sweep --over-checkpoints --by step --methods
moe,task_arithmetic,ties`` with validation accuracy: at each step the six adapters are upcycled
into an Arrow MoE (top k 2) and merged with each method. Prints the Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import BertForSequenceClassification

from scripts.testbed.build import build
from scripts.testbed.data import examples, load_digits, split_indices
from scripts.testbed.model import encode, make_tokenizer, train

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])


def lora_runs(testbed: Path, steps: int, every: int, lr: float) -> list[str]:
    manifest = json.loads((testbed / "testbed.json").read_text())
    tasks = manifest["tasks"]
    images, labels = load_digits()
    split = split_indices(len(labels), manifest["seed"], None)
    tokenizer = make_tokenizer()
    for i, task in enumerate(tasks):
        run = testbed / "lora" / task
        if run.exists():
            continue
        base = BertForSequenceClassification.from_pretrained(testbed / "base")
        model = get_peft_model(base, copy.deepcopy(LORA))  # peft writes into its config
        data = encode(tokenizer, examples(images[split.train], labels[split.train], task))

        def save(step: int, model: torch.nn.Module = model, run: Path = run) -> None:
            model.save_pretrained(run / f"checkpoint-{step}")

        train(model, data, steps, lr, 100 + i, every, save)
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/testbed-moe"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    testbed = args.out / "testbed"
    if not (testbed / "testbed.json").exists():
        build(testbed, reduced=True)
    tasks = lora_runs(testbed, args.steps, args.every, args.lr)
    recipe = {
        "base_model": "testbed/base",
        "models": [{"model": f"testbed/lora/{t}", "name": f"lora_{t}"} for t in tasks],
        "parameters": {"lambda": 1.0, "density": 0.5},
        "moe": {"top_k": 2},
        "evaluate": {
            "metric": "accuracy",
            "tasks": {t: {"data": f"testbed/data/{t}/validation.jsonl"} for t in tasks},
        },
    }
    path = args.out / "moe-durations.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = [sys.executable, "-m", "mergecli", "sweep", str(path), "--over-checkpoints"]
    argv += ["--by", "step", "--methods", "moe,task_arithmetic,ties", "--json", "--quiet"]
    done = subprocess.run(
        [*argv, "-o", str(args.out / "sweep"), "--force"], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(done.stderr)
    result = json.loads(done.stdout)
    print("| LoRA steps | " + " | ".join(result["methods"]) + " |")
    print("|---:|" + "---:|" * len(result["methods"]))
    for point in result["points"]:
        cells = [f"{100 * point['methods'][m]['score']:.1f}%" for m in result["methods"]]
        print(f"| {point['x']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
