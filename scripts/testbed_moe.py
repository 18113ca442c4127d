"""MoE against expert training duration on the testbed, beside task arithmetic and TIES.

``python -m scripts.testbed_moe [--part arrow|sparse|all] [--out .bench/testbed-moe]``

``arrow``: builds the reduced testbed (docs/testbed.md), fine-tunes one LoRA adapter per task
from its base (rank 4 on the attention's query and value, the base's trained head kept; a
checkpoint every ``--every`` steps), then runs ``mergecli sweep --over-checkpoints --by step
--methods moe,task_arithmetic,ties`` with validation accuracy: at each step the six adapters are
upcycled into an Arrow MoE (top k 2) and merged with each method.

``sparse``: the causal-LM variant (scripts/testbed_lm.py): six full Llama experts become a
Mixtral (top k 2, ``hidden`` gates from 4 training texts per task) at each step, scored by
validation loss, once as built and once after ``--train-steps`` of multi-task training of routers
and experts; figure ``docs/figures/testbed_moe_sparse.png``. Prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import BertForSequenceClassification

from scripts.testbed.build import build
from scripts.testbed.data import examples, load_digits, read_jsonl, split_indices
from scripts.testbed.model import encode, make_tokenizer, train
from scripts.testbed_lm import build_lm

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


def sweep(recipe: dict[str, object], path: Path, out: Path) -> dict[str, Any]:
    """``mergecli sweep --over-checkpoints --by step --methods moe,task_arithmetic,ties``."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = [sys.executable, "-m", "mergecli", "sweep", str(path), "--over-checkpoints"]
    argv += ["--by", "step", "--methods", "moe,task_arithmetic,ties", "--json", "--quiet"]
    done = subprocess.run([*argv, "-o", str(out), "--force"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def table(result: dict[str, Any], fmt: Callable[[float], str], steps: str) -> str:
    lines = [f"| {steps} | " + " | ".join(result["methods"]) + " | experts |"]
    lines.append("|---:|" + "---:|" * (len(result["methods"]) + 1))
    for point in result["points"]:
        cells = [fmt(point["methods"][m]["score"]) for m in result["methods"]]
        cells.append(fmt(point["expert_score"]))
        lines.append(f"| {point['x']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arrow(args: argparse.Namespace) -> None:
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
    result = sweep(recipe, args.out / "moe-durations.yaml", args.out / "sweep")
    print("Arrow MoE of LoRA experts, validation accuracy\n")
    print(table(result, lambda v: f"{100 * v:.1f}%", "LoRA steps"))


def sparse(args: argparse.Namespace) -> None:
    lm = args.out / "lm"
    tasks = build_lm(lm, args.pretrain_steps, args.lm_steps, args.lm_every)
    prompts = {
        t: {"positive": [r["text"] for r in read_jsonl(lm / "data" / t / "train.jsonl")[:4]]}
        for t in tasks
    }
    recipe: dict[str, Any] = {
        "base_model": "base",
        "models": [{"model": f"runs/{t}", "name": t} for t in tasks],
        "parameters": {"lambda": 1.0, "density": 0.5},
        "moe": {"top_k": 2, "gate_mode": "hidden", "prompts": prompts},
        "evaluate": {"metric": "loss", "data": "data/{task}/validation.jsonl"},
    }
    plain = sweep(recipe, lm / "moe-durations.yaml", lm / "sweep")
    recipe["moe"].update(
        train_steps=args.train_steps, lr=args.train_lr, train_data="data/{task}/train.jsonl"
    )
    trained = sweep(recipe, lm / "moe-trained-durations.yaml", lm / "sweep-trained")

    def fmt(v: float) -> str:
        return f"{v:.3f}"

    print("\nMixtral of full Llama experts, validation loss (lower is better), no training\n")
    print(table(plain, fmt, "expert steps"))
    print(f"\nthe same after {args.train_steps} steps of router + expert training\n")
    print(table(trained, fmt, "expert steps"))
    figure(plain, trained, args.train_steps, args.figure)


def figure(plain: dict[str, Any], trained: dict[str, Any], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["x"] for p in plain["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [
        ("MoE, no training", plain, "moe", "-o"),
        (f"MoE + {steps} training steps", trained, "moe", "-s"),
        ("task arithmetic", plain, "task_arithmetic", "-^"),
        ("TIES", plain, "ties", "-v"),
    ]
    for label, result, method, style in lines:
        ax.plot(xs, [p["methods"][method]["score"] for p in result["points"]], style, label=label)
    ax.plot(xs, [p["expert_score"] for p in plain["points"]], "k--", label="experts (own task)")
    ax.set_xlabel("expert fine-tuning steps")
    ax.set_ylabel("validation loss, mean over 6 tasks")
    ax.set_title("Causal-LM testbed: Mixtral MoE vs merging")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["arrow", "sparse", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(".bench/testbed-moe"))
    parser.add_argument("--steps", type=int, default=120, help="LoRA steps (arrow)")
    parser.add_argument("--every", type=int, default=30, help="LoRA checkpoint interval (arrow)")
    parser.add_argument("--lr", type=float, default=1e-2, help="LoRA learning rate (arrow)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="causal-LM base (sparse)")
    parser.add_argument("--lm-steps", type=int, default=60, help="expert steps (sparse)")
    parser.add_argument("--lm-every", type=int, default=15, help="checkpoint interval (sparse)")
    parser.add_argument("--train-steps", type=int, default=150, help="MoE training (sparse)")
    parser.add_argument("--train-lr", type=float, default=1e-3, help="MoE training (sparse)")
    parser.add_argument(
        "--figure", type=Path, default=Path("docs/figures/testbed_moe_sparse.png")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("arrow", "all"):
        arrow(args)
    if args.part in ("sparse", "all"):
        sparse(args)


if __name__ == "__main__":
    main()
