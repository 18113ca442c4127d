"""MoE against expert training duration on the testbed, beside task arithmetic and TIES.

``python -m scripts.testbed_moe [--part arrow|sparse|all] [--out .bench/testbed-moe]``

``arrow``: builds the reduced testbed (docs/testbed.md), fine-tunes one LoRA adapter per task
from its base (rank 4 on the attention's query and value, the base's trained head kept; a
checkpoint every ``--every`` steps), then runs ``mergecli sweep --over-checkpoints --by step
--methods moe,task_arithmetic,ties --grid lambda=0.1:1:0.1`` with validation accuracy: at each
step the six adapters are upcycled into an Arrow MoE (top k 2) and merged with each method (λ
tuned per step); the LoRA runs are scored on their own tasks here.

``sparse``: the causal-LM variant (scripts/testbed_lm.py): six full Llama experts become a
Mixtral (top k 2, ``hidden`` gates from 4 training texts per task) at each step, scored by
validation loss, once as built and once after ``--train-steps`` of multi-task training of routers
and experts; TA and TIES λ tuned per step; figure ``docs/figures/testbed-moe-sparse.png``; then
the label-word accuracy of every candidate at the last step. Prints the Markdown tables.
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
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

from scripts.testbed.build import build
from scripts.testbed.data import examples, load_digits, read_jsonl, split_indices
from scripts.testbed.model import Encoded, accuracy, encode, make_tokenizer, train
from scripts.testbed_lm import build_lm

METHODS = "moe,task_arithmetic,ties"
GRID = ("--grid", "lambda=0.1:1:0.1")
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


def sweep(
    recipe: dict[str, object], path: Path, out: Path, *extra: str, methods: str = METHODS
) -> dict[str, Any]:
    """``mergecli sweep --over-checkpoints --by step --methods METHODS [extra]``."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = [sys.executable, "-m", "mergecli", "sweep", str(path), "--over-checkpoints"]
    argv += ["--by", "step", "--methods", methods, "--json", "--quiet", *extra]
    done = subprocess.run([*argv, "-o", str(out), "--force"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def table(result: dict[str, Any], fmt: Callable[[float], str], steps: str) -> str:
    """Markdown: a row per step, a column per method and the experts (– where not scored)."""
    lines = [f"| {steps} | " + " | ".join(result["methods"]) + " | experts |"]
    lines.append("|---:|" + "---:|" * (len(result["methods"]) + 1))
    for point in result["points"]:
        cells = [fmt(point["methods"][m]["score"]) for m in result["methods"]]
        expert = point["expert_score"]
        cells.append("–" if expert is None else fmt(expert))
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
    result = sweep(recipe, args.out / "moe-durations.yaml", args.out / "sweep", *GRID)
    for point in result["points"]:  # the sweep scores no LoRA run on its own
        own = [lora_accuracy(testbed, t, point["x"]) for t in tasks]
        point["expert_score"] = sum(own) / len(own)
    print("Arrow MoE of LoRA experts, validation accuracy; TA and TIES at the best")
    print(f"{GRID[1]} per step, experts: each LoRA run on its own task\n")
    print(table(result, lambda v: f"{100 * v:.1f}%", "LoRA steps"))
    print(chosen(result))
    base = BertForSequenceClassification.from_pretrained(testbed / "base")
    base_scores = [accuracy(base, validation(testbed, t)) for t in tasks]
    print(f"base: {100 * sum(base_scores) / len(base_scores):.1f}%")


def validation(testbed: Path, task: str) -> Encoded:
    return encode(make_tokenizer(), read_jsonl(testbed / "data" / task / "validation.jsonl"))


def lora_accuracy(testbed: Path, task: str, step: int) -> float:
    """Validation accuracy of one LoRA checkpoint on its own task."""
    base = BertForSequenceClassification.from_pretrained(testbed / "base")
    model = PeftModel.from_pretrained(base, testbed / "lora" / task / f"checkpoint-{step}")
    return accuracy(model, validation(testbed, task))


def chosen(result: dict[str, Any]) -> str:
    """The lambda each merging method chose at each step."""
    return "\n".join(
        f"step {p['x']}: "
        + ", ".join(
            f"{m} {p['methods'][m]['parameters']['lambda']}" for m in ("task_arithmetic", "ties")
        )
        for p in result["points"]
    )


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
    plain = sweep(recipe, lm / "moe-durations.yaml", lm / "sweep", *GRID)
    recipe["moe"].update(
        train_steps=args.train_steps, lr=args.train_lr, train_data="data/{task}/train.jsonl"
    )
    trained = sweep(recipe, lm / "moe-trained-durations.yaml", lm / "sweep-trained", methods="moe")

    def fmt(v: float) -> str:
        return f"{v:.3f}"

    print("\nMixtral of full Llama experts, validation loss (lower is better), no training;")
    print(f"TA and TIES at the best {GRID[1]} per step\n")
    print(table(plain, fmt, "expert steps"))
    print(chosen(plain))
    print(f"\nthe MoE after {args.train_steps} steps of router + expert training\n")
    print(table(trained, fmt, "expert steps"))
    base = base_loss(lm)
    print(f"base: {base:.3f}")
    figure(plain, trained, base, args.train_steps, args.figure)
    print(f"\nlabel-word accuracy at step {args.lm_steps} (validation)\n")
    print(final_accuracy(lm, recipe, plain["points"][-1], tasks, args.lm_steps))


def final_accuracy(
    lm: Path, recipe: dict[str, Any], point: dict[str, Any], tasks: list[str], step: int
) -> str:
    """Label-word accuracy of every candidate at the last step: argmax over ``d0``..``d9``."""
    at = {**recipe, "models": [{"model": f"runs/{t}/checkpoint-{step}", "name": t} for t in tasks]}
    untrained = {k: v for k, v in recipe["moe"].items() if k not in ("train_steps", "lr")}
    plain_moe = {**at, "moe": untrained}
    builds: dict[str, tuple[str, dict[str, Any]]] = {
        "MoE, no training": ("moe", plain_moe),
        "MoE + training": ("moe", at),
    }
    for method in ("task_arithmetic", "ties"):
        params = {**recipe["parameters"], **(point["methods"][method].get("parameters") or {})}
        if method == "task_arithmetic":
            params.pop("density")
        merged = {k: v for k, v in at.items() if k not in ("moe", "parameters")}
        builds[method] = ("merge", {**merged, "merge_method": method, "parameters": params})
    folders = {"base": lm / "base"}
    for name, (command, built) in builds.items():
        path = lm / f"final-{name.split(',')[0].replace(' + ', '-').replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump(built, sort_keys=False))
        folders[name] = lm / "final" / path.stem
        argv = [sys.executable, "-m", "mergecli", command, str(path), "-o", str(folders[name])]
        done = subprocess.run([*argv, "--force", "--quiet"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr)
    data = {t: read_jsonl(lm / "data" / t / "validation.jsonl") for t in tasks}
    scores = {name: [label_accuracy(f, data[t]) for t in tasks] for name, f in folders.items()}
    scores["experts (own task)"] = [
        label_accuracy(lm / "runs" / t / f"checkpoint-{step}", data[t]) for t in tasks
    ]
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for name, row in scores.items():
        cells = [f"{100 * v:.1f}%" for v in [*row, sum(row) / len(row)]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def label_accuracy(folder: Path, records: list[dict[str, str | int]]) -> float:
    """The label word the model ranks first among ``d0``..``d9`` after ``=``."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = [str(r["text"]) for r in records]
    ids = torch.tensor(tokenizer(texts)["input_ids"])
    words = tokenizer.convert_tokens_to_ids([f"d{i}" for i in range(10)])
    logits = model(input_ids=ids[:, :-1]).logits[:, -1, words]
    truth = torch.tensor([words.index(int(i)) for i in ids[:, -1]])
    return float((logits.argmax(-1) == truth).float().mean())


def base_loss(lm: Path) -> float:
    """``mergecli evaluate moe-durations.yaml --model base``: the base's mean validation loss."""
    argv = [sys.executable, "-m", "mergecli", "evaluate", str(lm / "moe-durations.yaml")]
    argv += ["--model", str(lm / "base"), "--json", "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    return float(json.loads(done.stdout)["rows"][0]["score"])


def figure(
    plain: dict[str, Any], trained: dict[str, Any], base: float, steps: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["x"] for p in plain["points"]]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    lines = [
        ("MoE, no training", plain, "moe", "-o"),
        (f"MoE + {steps} training steps", trained, "moe", "-s"),
        ("task arithmetic (best λ)", plain, "task_arithmetic", "-^"),
        ("TIES (best λ)", plain, "ties", "-v"),
    ]
    for label, result, method, style in lines:
        ax.plot(xs, [p["methods"][method]["score"] for p in result["points"]], style, label=label)
    ax.plot(xs, [p["expert_score"] for p in plain["points"]], "k--", label="experts (own task)")
    ax.axhline(base, color="grey", linestyle=":", label="base")
    ax.set_xlabel("expert fine-tuning steps")
    ax.set_ylabel("validation loss, mean over 6 tasks")
    ax.set_title("Causal-LM testbed: Mixtral MoE vs merging")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize="small")
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
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/testbed-moe-sparse.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("arrow", "all"):
        arrow(args)
    if args.part in ("sparse", "all"):
        sparse(args)


if __name__ == "__main__":
    main()
