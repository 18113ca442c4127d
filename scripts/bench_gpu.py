"""One short GPU measurement: floor, mergecli on the GPU (and mergekit ``--cuda`` when its venv
exists) for linear, task_arithmetic, ties and dare_ties, each output checked against mergecli's
CPU output within one bfloat16 step, and the input GB/s of every command.

``bash scripts/bench_gpu.sh [--size-mb 1000] [--experts 3] [--methods ...]`` — sized to finish
in under 5 minutes on one GPU with 1–2 GB checkpoints. Without CUDA it prints one line and
exits 0; ``--device cpu`` runs the same steps on the CPU (the tests use it with tiny models).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from scripts.bench_speed import BENCH, MERGEKIT_VENV, max_abs_diff, mergecli_merge, recipe
from scripts.bench_speed import shape_for_size as _shape
from scripts.llama_checkpoints import write_family
from scripts.measure import measure

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


def run(label: str, argv: list[str], env: dict[str, str], nbytes: int) -> dict:
    """One whole-process run: wall seconds and input GB/s."""
    result = measure(argv, env)
    row = {"label": label, "wall_s": result.seconds, "gb_s": nbytes / result.seconds / 1e9}
    print(f"{label}: {row['wall_s']:.2f} s, {row['gb_s']:.2f} GB/s", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=1000.0)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--bench-dir", type=Path, default=BENCH / "gpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available on this machine: nothing measured.")
        return
    started = time.perf_counter()
    root: Path = args.bench_dir
    shape = _shape(args.size_mb)
    base, experts = write_family(
        root / f"models-{shape.hidden}x{shape.layers}", shape, args.experts
    )
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    floor = [sys.executable, "-m", "scripts.io_floor", str(out / "floor"), str(base)]
    rows = [run("I/O floor", [*floor, *map(str, experts)], env, model_bytes * (1 + len(experts)))]
    mergekit = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    failed = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        path = root / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, base, experts), sort_keys=False))
        nbytes = model_bytes * (len(experts) + (method != "linear"))
        device_out, cpu_out = out / f"{method}-{args.device}", out / f"{method}-cpu"
        rows.append(
            run(f"mergecli {method}", mergecli_merge(path, device_out, args.device), env, nbytes)
        )
        if args.device != "cpu":
            run(f"mergecli {method} (CPU reference)", mergecli_merge(path, cpu_out, "cpu"), env, 1)
        else:
            cpu_out = device_out
        if args.device == "cuda" and mergekit.exists():
            kit = [str(mergekit), str(path), str(out / f"mergekit-{method}"), "--cuda"]
            rows.append(run(f"mergekit {method}", [*kit, "--no-copy-tokenizer"], env, nbytes))
        diff, scale = max_abs_diff(device_out, cpu_out)
        step = float(torch.finfo(torch.bfloat16).eps) * scale
        ok = diff <= step
        print(f"- {method}: max |{args.device} − cpu| = {diff:.3g}, one bfloat16 step {step:.3g}")
        if not ok:
            failed.append(method)
    print("| command | wall s | input GB/s |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['wall_s']:.2f} | {row['gb_s']:.2f} |")
    total = time.perf_counter() - started
    print(f"{args.experts} experts + base of {model_bytes / 1e9:.2f} GB each; {total:.0f} s in all")
    shutil.rmtree(out, ignore_errors=True)
    if failed:
        sys.exit(f"bench_gpu: {', '.join(failed)} differ from the CPU by more than one bf16 step")


if __name__ == "__main__":
    main()
