"""Peak memory of `mergecli moe` (sparse Mixtral) for two model depths: it must not grow with
the model.

``python -m scripts.bench_moe_memory [--small-layers 2] [--large-layers 32] [--experts 3]``
generates Llama-shaped bfloat16 checkpoints (a base and the experts, in several shards, as
``scripts.bench_memory`` does) under ``.bench/memory``, with a tiny word-level tokenizer for the
prompts, and builds a Mixtral of the experts with ``random`` and with ``hidden`` gates (the base
run one layer at a time). Each run is its own process; the table gives its peak resident memory
(``ru_maxrss``) beside the sizes of one input model and of the MoE output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scripts.bench_memory import MIB, ROOT
from scripts.fixtures import save_tokenizer
from scripts.llama_checkpoints import LlamaShape, write_family
from scripts.measure import measure

PROMPTS = ["w1 w2 w3 w4", "w10 w11 w12", "w20 w21 w22 w23", "w30 w31", "w40 w41 w42"]


def recipe(root: Path, experts: list[Path], base: Path, mode: str) -> Path:
    moe: dict[str, object] = {"gate_mode": mode, "experts_per_token": 2}
    if mode != "random":
        moe["prompts"] = {
            p.name: {"positive": [PROMPTS[i % len(PROMPTS)]]} for i, p in enumerate(experts)
        }
    spec = {"base_model": str(base), "models": [{"model": str(p)} for p in experts], "moe": moe}
    path = root / f"moe-{mode}.yaml"
    path.write_text(json.dumps(spec))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--large-layers", type=int, default=32)
    parser.add_argument("--experts", type=int, default=3)
    args = parser.parse_args()
    python = sys.executable
    idle = measure([python, "-c", "import torch, transformers, mergecli.moe"])
    rows = []
    for layers in (args.small_layers, args.large_layers):
        shape = LlamaShape(layers=layers)
        root = ROOT / f"layers{layers}"
        base, experts = write_family(root, shape, args.experts)
        save_tokenizer(base)
        for mode in ("random", "hidden"):
            out = root / f"moe-{mode}"
            argv = [python, "-m", "mergecli", "moe", str(recipe(root, experts, base, mode))]
            run = measure([*argv, "-o", str(out), "--force", "--quiet"])
            output = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append((layers, mode, shape.numel() * 2, output, run))
    print(
        f"{args.experts} experts, bfloat16, torch {torch.__version__}; a process that only "
        f"imports torch, transformers and mergecli.moe: {idle.peak_rss_bytes / MIB:.0f} MiB"
    )
    print("| layers | gate mode | one input model | MoE output | peak RSS | above idle | time |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for layers, mode, model, output, run in rows:
        print(
            f"| {layers} | {mode} | {model / MIB:.0f} MiB | {output / MIB:.0f} MiB | "
            f"{run.peak_rss_bytes / MIB:.0f} MiB | "
            f"{(run.peak_rss_bytes - idle.peak_rss_bytes) / MIB:.0f} MiB | {run.seconds:.1f} s |"
        )


if __name__ == "__main__":
    main()
