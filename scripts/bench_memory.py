"""Peak memory of `mergecli merge` for two model sizes: it must not grow with the model.

``python -m scripts.bench_memory [--small-layers 2] [--large-layers 32] [--method ties]``
generates Llama-shaped bfloat16 checkpoints (a base and three experts, in several shards) of two
depths under ``.bench/memory``; the larger model is at least 20 times its largest tensor. Each
merge runs as its own process; the table gives its peak resident memory (``ru_maxrss``) next to
the model size and the memory of a process that only imports mergecli and torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scripts.llama_checkpoints import LlamaShape, write_family
from scripts.measure import measure

ROOT = Path(".bench/memory")
MIB = 2**20


def recipe(folder: Path, method: str, experts: list[Path], base: Path) -> Path:
    """A mergekit-style recipe over ``experts``."""
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in experts]
    path = folder / f"{method}.yaml"
    path.write_text(
        json.dumps(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": models,
                "parameters": {"lambda": 1.0},
                "dtype": "float32",
                "seed": 0,
            }
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--large-layers", type=int, default=32)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    python = sys.executable
    idle = measure([python, "-c", "import torch, mergecli.engine.merge"])
    rows = []
    for layers in (args.small_layers, args.large_layers):
        shape = LlamaShape(layers=layers)
        root = ROOT / f"layers{layers}"
        base, experts = write_family(root, shape, args.experts)
        path = recipe(root, args.method, experts, base)
        out = root / f"merged-{args.method}"
        run = measure(
            [python, "-m", "mergecli", "merge", str(path), "-o", str(out), "--force", "--quiet"]
        )
        model_bytes = shape.numel() * 2
        rows.append(
            {
                "layers": layers,
                "model_mib": model_bytes / MIB,
                "inputs_mib": model_bytes * (args.experts + 1) / MIB,
                "model_over_largest_tensor": shape.numel() / shape.largest(),
                "peak_rss_mib": run.peak_rss_bytes / MIB,
                "above_idle_mib": (run.peak_rss_bytes - idle.peak_rss_bytes) / MIB,
                "seconds": run.seconds,
            }
        )
    if args.json:
        print(json.dumps({"idle_rss_mib": idle.peak_rss_bytes / MIB, "rows": rows}, indent=2))
        return
    print(
        f"method {args.method}, {args.experts} experts + base, bfloat16 inputs, "
        f"float32 compute, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"a process that only imports torch and mergecli: {idle.peak_rss_bytes / MIB:.0f} MiB")
    print("| layers | one model | all inputs | model / largest tensor | peak RSS | above idle |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['model_mib']:.0f} MiB | {r['inputs_mib']:.0f} MiB | "
            f"{r['model_over_largest_tensor']:.1f}× | {r['peak_rss_mib']:.0f} MiB | "
            f"{r['above_idle_mib']:.0f} MiB |"
        )
    small, large = rows
    print(
        f"inputs grow {large['inputs_mib'] / small['inputs_mib']:.1f}×, "
        f"memory above idle grows {large['above_idle_mib'] / max(small['above_idle_mib'], 1):.2f}×"
    )


if __name__ == "__main__":
    main()
