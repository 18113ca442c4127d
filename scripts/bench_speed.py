"""Speed and memory of mergecli against the I/O floor and mergekit, measured side by side.

``python -m scripts.bench_speed [--size-mb 1000] [--experts 3] [--runs 3]
[--methods linear,task_arithmetic,ties,dare_ties] [--device cpu|cuda] [--json]``

It generates a Llama-shaped bfloat16 base and experts (``scripts.llama_checkpoints``) under
``.bench/``, installs mergekit into ``.bench/mergekit-venv`` (the local torch build first, so no
CUDA packages are pulled), then runs, alternating, in every round: the I/O floor
(``scripts.io_floor``), ``mergecli merge`` and ``mergekit-yaml`` on the same recipe for each
method (mergecli's ``ties`` twice: scope model, its default, and scope tensor, mergekit's).
Every command is a whole process: its wall time, CPU time and peak resident memory
(``ru_maxrss`` from ``wait4``, ``scripts.measure``) are recorded, and the medians over the
rounds printed as a markdown table with the ratios mergecli / floor and mergekit / mergecli.
Outputs of the two tools are compared where they share a convention (linear,
task_arithmetic). A last check merges a 150k × 4k embedding alone, to show that peak memory
does not grow with the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from safetensors import safe_open

from scripts.llama_checkpoints import LlamaShape, write_family
from scripts.measure import measure

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
MERGEKIT_VENV = BENCH / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
NUMBA_START = (
    "import numpy, torch; from mergecli.methods.row_sums import row_sums; "
    "row_sums(numpy.zeros(1, 'float32'), numpy.zeros(1, 'float32'))"
)
"""A process importing torch and running mergecli's first compiled loop (numba's import and
first call: loading its registries and the cached machine code)."""
SHARED_CONVENTION = ("linear", "task_arithmetic")
"""Methods whose outputs the two tools must agree on (same formula, same rounding order up to
float32 summation)."""


@dataclass
class Command:
    """One benchmarked command line and the times and peaks of its runs."""

    label: str
    tool: str
    method: str | None
    argv: list[str]
    output: Path
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    merge_walls: list[float] = field(default_factory=list)
    """mergecli's own wall time of the merge (``merge_report.json``: run.timing.wall_s), which
    leaves out the process's start-up (imports) and the reports."""

    def run(self, env: dict[str, str]) -> None:
        shutil.rmtree(self.output, ignore_errors=True)
        try:
            run = measure(self.argv, env)
        except RuntimeError as exc:
            sys.exit(f"{self.label}: {exc}")
        self.walls.append(run.seconds)
        self.cpus.append(run.cpu_seconds)
        self.peaks.append(run.peak_rss_bytes)
        report = self.output / "merge_report.json"
        if self.tool == "mergecli" and report.is_file():
            self.merge_walls.append(json.loads(report.read_text())["run"]["timing"]["wall_s"])

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def peak(self) -> int:
        return int(statistics.median(self.peaks))

    @property
    def merge_wall(self) -> float | None:
        return statistics.median(self.merge_walls) if self.merge_walls else None


def shape_for_size(size_mb: float, layers: int = 8) -> LlamaShape:
    """A Llama of ``layers`` layers (32k vocabulary, full attention, intermediate about 8/3 of
    the hidden size) whose bfloat16 checkpoint is closest to ``size_mb`` megabytes."""
    shapes = [
        LlamaShape(layers, h, round(h * 8 / 3 / 256) * 256, 32000, h // 64, h // 64)
        for h in range(256, 16385, 128)
    ]
    return min(shapes, key=lambda s: abs(s.numel() * 2 - size_mb * 1e6))


def ensure_mergekit() -> Path:
    """``mergekit-yaml`` in its own venv, installed on first use with the local torch first."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit {MERGEKIT_VERSION} into {MERGEKIT_VENV} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def recipe(method: str, base: Path, experts: list[Path], dtype: str = "float32") -> dict:
    """A recipe both tools accept (mergecli reads mergekit's format)."""
    n = len(experts)
    per_model: list[dict[str, float]] = {
        "linear": [{"weight": 1.0 / n}] * n,
        "task_arithmetic": [{"weight": 1.0 / n}] * n,
        "ties": [{"weight": 1.0, "density": 0.3}] * n,
        "dare_ties": [{"weight": 1.0, "density": 0.5}] * n,
    }[method]
    out: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        out["base_model"] = str(base)
    out["models"] = [
        {"model": str(e), "parameters": p} for e, p in zip(experts, per_model, strict=True)
    ]
    out["dtype"] = dtype
    out["out_dtype"] = "bfloat16"
    return out


def mergecli_merge(recipe: Path, out: Path, device: str, *options: object) -> list[str]:
    """The ``mergecli merge`` command line of this checkout."""
    argv = [sys.executable, "-m", "mergecli", "merge", str(recipe), "--output", str(out)]
    return [*argv, "--quiet", "--device", device, *map(str, options)]


def commands(
    methods: list[str], base: Path, experts: list[Path], args: argparse.Namespace
) -> list[Command]:
    """The floor, then per method mergecli's variants and mergekit, in the order they alternate."""
    out_dir = BENCH / "out"
    recipes = BENCH / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    shard_bytes = max(
        (base / f).stat().st_size for f in {p.name for p in base.glob("*.safetensors")}
    )
    py = sys.executable
    cmds = [
        Command("start-up", "startup", None, [py, "-c", "import torch"], out_dir / "startup"),
        Command("start-up with numba", "startup", None, [py, "-c", NUMBA_START], out_dir / "n"),
        Command(
            "I/O floor",
            "floor",
            None,
            [py, "-m", "scripts.io_floor", str(out_dir / "floor"), str(base), *map(str, experts)],
            out_dir / "floor",
        ),
    ]
    for method in methods:
        spec = recipe(method, base, experts)
        variants = [("", spec)]
        if method == "ties":
            scoped = {**spec, "parameters": {"scope": "tensor"}}
            variants = [(" (model scope)", spec), (" (tensor scope)", scoped)]
        for suffix, body in variants:
            tag = f"{method}{suffix.replace(' ', '-').replace('(', '').replace(')', '')}"
            path = recipes / f"mergecli-{tag}.yaml"
            path.write_text(yaml.safe_dump(body, sort_keys=False))
            argv = mergecli_merge(path, out_dir / tag, args.device, "--shard-size", shard_bytes)
            cmds.append(
                Command(f"mergecli {method}{suffix}", "mergecli", method, argv, out_dir / tag)
            )
        if args.mergekit:
            path = recipes / f"mergekit-{method}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            argv = [str(ensure_mergekit()), str(path), str(out_dir / f"mergekit-{method}")]
            argv += ["--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
            argv += ["--out-shard-size", str(shard_bytes // 2)]
            if args.device == "cuda":
                argv.append("--cuda")
            cmds.append(
                Command(
                    f"mergekit {method}", "mergekit", method, argv, out_dir / f"mergekit-{method}"
                )
            )
    return cmds


def tensor_files(folder: Path) -> dict[str, Path]:
    """Which shard of an output folder holds each tensor."""
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({name: file for name in handle.keys()})  # noqa: SIM118
    return out


def max_abs_diff(a: Path, b: Path) -> tuple[float, float]:
    """Largest |a − b| over every tensor of two output folders, and the largest |a|."""
    diff = scale = 0.0
    files_b = tensor_files(b)
    for name, file in tensor_files(a).items():
        with safe_open(str(file), "pt") as ha, safe_open(str(files_b[name]), "pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        diff = max(diff, float((x - y).abs().max()))
        scale = max(scale, float(x.abs().max()))
    return diff, scale


def embedding_check(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Peak memory of mergecli merging one ``rows × cols`` embedding (a 150k × 4k vocabulary)."""
    shape = LlamaShape(0, args.embedding_cols, 256, args.embedding_rows, tie_embeddings=True)
    base, experts = write_family(
        BENCH / f"embedding-{shape.vocab}x{shape.hidden}", shape, args.experts
    )
    rows = {}
    for method in ("task_arithmetic", "ties"):
        path = BENCH / "recipes" / f"embedding-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, base, experts), sort_keys=False))
        out = BENCH / "out" / f"embedding-{method}"
        argv = mergecli_merge(path, out, args.device)
        cmd = Command(f"mergecli {method}", "mergecli", method, argv, out)
        cmd.run(env)
        shutil.rmtree(out, ignore_errors=True)
        rows[method] = {"wall_s": cmd.wall, "peak_rss_bytes": cmd.peak}
    numel = shape.vocab * shape.hidden
    return {
        "shape": [shape.vocab, shape.hidden],
        "experts": args.experts,
        "float32_copy_bytes": numel * 4,
        "bfloat16_copy_bytes": numel * 2,
        "runs": rows,
    }


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table(result: dict[str, Any]) -> str:
    """The figures as a markdown table, then the agreement and embedding lines."""
    rows = result["commands"]
    floor = next(r for r in rows if r["tool"] == "floor")
    mergecli = {r["label"].removeprefix("mergecli "): r for r in rows if r["tool"] == "mergecli"}
    lines = [
        "| command | wall s | CPU s | peak RSS GB | input GB/s | mergecli / floor "
        "| mergekit / mergecli | mergecli peak / mergekit peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["tool"] == "startup":
            continue
        ratio_floor = ratio_kit = ratio_mem = ""
        if r["tool"] == "mergecli":
            ratio_floor = f"{r['wall_s'] / floor['wall_s']:.2f}"
        if r["tool"] == "mergekit":
            ours = [v for k, v in mergecli.items() if k.split(" ")[0] == r["method"]]
            ratio_kit = " / ".join(f"{r['wall_s'] / o['wall_s']:.1f}" for o in ours)
            ratio_mem = " / ".join(f"{o['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}" for o in ours)
        lines.append(
            f"| {r['label']} | {r['wall_s']:.2f} | {r['cpu_s']:.1f} | {gb(r['peak_rss_bytes'])} "
            f"| {r['input_bytes'] / r['wall_s'] / 1e9:.2f} | {ratio_floor} | {ratio_kit} "
            f"| {ratio_mem} |"
        )
    startups = [r for r in rows if r["tool"] == "startup"]
    if len(startups) == 2:
        startup, numba = startups
        work = floor["wall_s"] - startup["wall_s"]
        compiled = numba["wall_s"] - startup["wall_s"]
        lines += [
            "",
            "Where the time goes: the start-up every command pays (a Python process importing "
            f"torch: {startup['wall_s']:.2f} s, {startup['cpu_s']:.1f} s CPU), numba's start-up "
            f"on top of it for merges with compiled loops ({compiled:.2f} s: import and first "
            f"call), the floor's own work ({work:.2f} s) and each merge's own "
            "wall time (its report's run.timing.wall_s: numba's start-up included, mergecli's "
            "imports, planning and reports left out):",
            "",
            "| command | wall s | merge s | rest of the process s | merge / floor's work |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r["tool"] == "mergecli" and r["merge_wall_s"] is not None:
                merge = r["merge_wall_s"]
                lines.append(
                    f"| {r['label']} | {r['wall_s']:.2f} | {merge:.2f} | "
                    f"{r['wall_s'] - merge:.2f} | {merge / work:.2f} |"
                )
    m = result["machine"]
    size = result["models"]
    lines += [
        "",
        f"{size['experts']} experts + base, {gb(size['bytes_per_model'])} GB each "
        f"(bfloat16, {size['layers']} layers, hidden {size['hidden']}, {size['shards']} shards), "
        f"median of {result['runs']} alternating runs, device {result['device']}; "
        f"{m['cpu']}, {m['cores']} cores, {gb(m['ram_bytes'])} GB RAM, torch {m['torch']}.",
    ]
    for method, check in result.get("agreement", {}).items():
        lines.append(
            f"- {method}: max |mergecli − mergekit| = {check['max_abs_diff']:.3g} "
            f"(largest |weight| {check['scale']:.3g}, bfloat16 spacing there "
            f"{check['tolerance']:.3g}): {'agree' if check['agree'] else 'DIFFER'}"
        )
    emb = result.get("embedding")
    if emb:
        for method, run in emb["runs"].items():
            lines.append(
                f"- {method} on one {emb['shape'][0]} × {emb['shape'][1]} embedding "
                f"({emb['experts']} experts + base): peak RSS {gb(run['peak_rss_bytes'])} GB; one "
                f"float32 copy of the tensor is {gb(emb['float32_copy_bytes'])} GB"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=1000.0, help="size of each checkpoint")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--no-mergekit",
        dest="mergekit",
        action="store_false",
        help="measure the floor and mergecli only",
    )
    parser.add_argument(
        "--embedding-rows",
        type=int,
        default=150_000,
        help="rows of the embedding-only memory check (0 skips it)",
    )
    parser.add_argument("--embedding-cols", type=int, default=4096)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not among {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: nothing measured (use --device cpu).")
        return

    shape = shape_for_size(args.size_mb)
    folder = BENCH / f"models-{shape.hidden}x{shape.layers}-{args.experts}e"
    print(f"generating checkpoints in {folder} ...", file=sys.stderr)
    base, experts = write_family(folder, shape, args.experts)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmds = commands(methods, base, experts, args)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    for r in range(args.runs):
        for cmd in cmds:
            cmd.run(env)
            print(
                f"round {r + 1}/{args.runs}: {cmd.label}: {cmd.walls[-1]:.2f} s, "
                f"{cmd.cpus[-1]:.1f} s CPU, {gb(cmd.peaks[-1])} GB peak",
                file=sys.stderr,
            )

    result: dict[str, Any] = {
        "machine": machine(),
        "device": args.device,
        "runs": args.runs,
        "models": {
            "experts": args.experts,
            "bytes_per_model": model_bytes,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "shards": len(list(base.glob("*.safetensors"))),
        },
        "commands": [
            {
                "label": c.label,
                "tool": c.tool,
                "method": c.method,
                "wall_s": c.wall,
                "walls_s": c.walls,
                "cpu_s": c.cpu,
                "peak_rss_bytes": c.peak,
                "merge_wall_s": c.merge_wall,
                "input_bytes": model_bytes * (len(experts) + (c.method != "linear")),
            }
            for c in cmds
        ],
    }
    if args.mergekit:
        result["agreement"] = {}
        for method in [m for m in methods if m in SHARED_CONVENTION]:
            diff, scale = max_abs_diff(BENCH / "out" / method, BENCH / "out" / f"mergekit-{method}")
            tolerance = float(torch.finfo(torch.bfloat16).eps) * scale
            result["agreement"][method] = {
                "max_abs_diff": diff,
                "scale": scale,
                "tolerance": tolerance,
                "agree": diff <= tolerance,
            }
    if args.embedding_rows:
        print("embedding memory check ...", file=sys.stderr)
        result["embedding"] = embedding_check(args, env)
    shutil.rmtree(BENCH / "out", ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
