"""Peak memory of merging LoRA adapters, for two model depths: it must not grow with the model.

``python -m scripts.bench_adapters [--small-layers 2] [--large-layers 24] [--rank 16]``
writes a Llama-shaped bfloat16 base (``scripts.llama_checkpoints``) and three LoRA adapters on
every linear layer under ``.bench/adapters``, then measures ``mergecli merge`` (TIES into a full
model, and task arithmetic into a LoRA adapter) as separate processes. Task vectors are computed
per tensor, so the peak above an idle process should stay flat while the model grows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from scripts.bench_memory import MIB
from scripts.llama_checkpoints import LlamaShape, write_checkpoint
from scripts.measure import measure

ROOT = Path(".bench/adapters")
RUNS = (("ties", {"parameters": {"density": 0.3}}), ("task_arithmetic", {"output_format": "lora"}))
"""TIES into a full model (base from the adapters' config), task arithmetic into a LoRA."""
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora(folder: Path, base: Path, shape: LlamaShape, rank: int, seed: int) -> Path:
    """A LoRA adapter (peft's file layout) with random A and B on every linear layer."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in (t for t in shape.tensors() if t[0].split(".")[-2] in TARGETS):
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base.resolve()),
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--large-layers", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    python = sys.executable
    idle = measure([python, "-c", "import torch, peft, mergecli.engine.merge"])
    rows = []
    for layers in (args.small_layers, args.large_layers):
        shape = LlamaShape(layers=layers)
        root = ROOT / f"layers{layers}"
        base = root / "base"
        if not (base / "config.json").exists():
            write_checkpoint(base, shape, seed=0)
        adapters = [write_lora(root / f"lora{i}", base, shape, args.rank, 1 + i) for i in range(3)]
        row = {"layers": layers, "base_mib": shape.numel() * 2 / MIB}
        for method, options in RUNS:
            path = root / f"{method}.yaml"
            models = [{"model": str(a)} for a in adapters]
            path.write_text(json.dumps({"merge_method": method, "models": models, **options}))
            out = root / f"merged-{method}"
            run = measure(
                [python, "-m", "mergecli", "merge", str(path), "-o", str(out), "--force", "-q"]
            )
            row[f"{method}_above_idle_mib"] = (run.peak_rss_bytes - idle.peak_rss_bytes) / MIB
            row[f"{method}_seconds"] = run.seconds
        rows.append(row)
    print(f"3 LoRA adapters of rank {args.rank} on every linear layer, bfloat16 base")
    print(
        f"a process that only imports torch, peft and mergecli: {idle.peak_rss_bytes / MIB:.0f}MiB"
    )
    print("| layers | base | TIES → model, above idle | TA → LoRA, above idle |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['base_mib']:.0f} MiB | {r['ties_above_idle_mib']:.0f} MiB "
            f"({r['ties_seconds']:.1f} s) | {r['task_arithmetic_above_idle_mib']:.0f} MiB "
            f"({r['task_arithmetic_seconds']:.1f} s) |"
        )
    small, large = rows
    growth = {
        m: large[f"{m}_above_idle_mib"] / max(small[f"{m}_above_idle_mib"], 1) for m, _ in RUNS
    }
    print(
        f"base grows {large['base_mib'] / small['base_mib']:.1f}×, memory above idle grows "
        f"{growth['ties']:.2f}× (TIES), {growth['task_arithmetic']:.2f}× (LoRA output)"
    )


if __name__ == "__main__":
    main()
