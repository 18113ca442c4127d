"""Fault injection: interrupt mergecli at random moments and check that nothing wrong is left.

    python -m scripts.fault_injection --runs 50 [--seed 0] [--json]

Each run starts one of ``merge``, ``flex``, ``temporal add`` and ``export`` (in turn) as a
subprocess, sends it SIGKILL, SIGTERM or SIGINT at a random moment (half of the runs: any time
up to the length of an uninterrupted run; the other half: within a second of its temporary
folder's appearance, while it writes), then checks:

- an output that exists is complete and identical (tensors, config, manifest; reports but for
  their volatile ``run`` section) to the uninterrupted run's;
- SIGTERM and SIGINT exit with 143 and 130 and leave no temporary folder;
- the next run into the same output succeeds, gives the same output, and leaves no temporary
  folder or lock file of any run (a killed run's included).

First, once each: a NaN expert (exit 2, nothing written), two concurrent runs into one output
(one succeeds, the other fails at once naming it, or waits with --wait), and a full disk on a
small tmpfs (mounted when the machine allows it, else skipped): the free-space check refuses
at once, and two runs that each fit but not together end with one clean "No space" error.
Ctrl-C stops the runs and prints the summary of those done.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import write_random_experts

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
EXIT = {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}
OPERATIONS = ("merge", "flex", "temporal", "export")
MARKS = (".mergecli-tmp-", ".mergecli-old-", ".mergecli-lock", ".tmp-")


def mergecli(*args: object, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "mergecli", *map(str, args), *(["--quiet"] if quiet else [])]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Bench:
    """The models, recipes and uninterrupted reference outputs, in one scratch folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        write_random_experts(root, 12, (256, 512), 3, seed=0, varied=True)
        models = [{"model": str(root / f"e{t}")} for t in range(3)]
        common = {"base_model": str(root / "base"), "models": models}
        self.merge = write_yaml(
            root / "merge.yaml",
            {**common, "merge_method": "ties", "parameters": {"density": 0.5}},
        )
        self.flex = write_yaml(
            root / "flex.yaml",
            {
                **common,
                "merge_method": "task_arithmetic",
                "flex": {"granularity": "layer", "sizes": [1.5, 2]},
            },
        )
        artifact = write_yaml(root / "emr.yaml", {**common, "merge_method": "emr"})
        self.artifact = root / "artifact"
        self.check(run([*mergecli("merge", artifact, "--output", self.artifact)]))
        self.state0 = root / "state0"
        self.check(
            run(mergecli("temporal", "init", self.state0, "--base", root / "base", quiet=False))
        )
        self.reference: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}
        for op in OPERATIONS:
            target = root / f"reference-{op}"
            start = time.perf_counter()
            self.check(run(self.command(op, target)))
            self.seconds[op] = time.perf_counter() - start
            self.reference[op] = target

    @staticmethod
    def check(done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            raise SystemExit(f"setup failed: {done.args}: {done.stderr.strip()}")

    def prepare(self, op: str, target: Path) -> None:
        """A temporal run adds an expert to a fresh copy of the initialised state."""
        if op == "temporal" and not target.exists():
            shutil.copytree(self.state0, target, symlinks=True)

    def command(self, op: str, target: Path, *extra: str) -> list[str]:
        self.prepare(op, target)
        if op == "merge":
            return mergecli("merge", self.merge, "--output", target, *extra)
        if op == "flex":
            return mergecli("flex", self.flex, "--output", target, *extra)
        if op == "export":
            return mergecli("export", self.artifact, "--task", "e1", "--output", target, *extra)
        return mergecli("temporal", "add", target, self.root / "e1")


@functools.cache
def reference_content(folder: Path) -> dict[str, Any]:
    return content(folder)


def content(folder: Path) -> dict[str, Any]:
    """What must not differ between two runs: every file's bytes (tensors as tensors), a JSON
    report without its volatile ``run`` section; links by target."""
    out: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = os.readlink(path)
        elif not path.is_file() or path.suffix in (".md", ".png"):
            continue  # model cards and markdown reports hold timings; figures hold fonts
        elif path.suffix == ".safetensors":  # deterministic: the same bytes
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.name.endswith("report.json"):
            data = json.loads(path.read_text())
            out[rel] = {k: v for k, v in data.items() if k not in ("run", "timing")}
        else:
            out[rel] = path.read_bytes()
    return out


def marks(folder: Path) -> list[str]:
    """Temporary folders and lock files of runs, beside the target or inside it."""
    places = [*folder.parent.iterdir(), *(folder.rglob("*") if folder.is_dir() else [])]
    return sorted(str(p) for p in places if any(m in p.name for m in MARKS))


def looks_complete(op: str, target: Path) -> bool:
    """An output folder; for a temporal state, a deploy link to a step's model."""
    if op == "temporal":
        return (target / "deploy").exists() and "steps" in str(os.readlink(target / "deploy"))
    return target.is_dir()


def same(op: str, target: Path, reference: Path) -> bool:
    """The outputs agree; for a temporal state, its init and deploy models (a state killed
    after its commit may still hold what the next run collects)."""
    if op == "temporal":
        return all(
            content(target / m) == reference_content(reference / m) for m in ("init", "deploy")
        )
    return content(target) == reference_content(reference)


def one_run(bench: Bench, op: str, name: str, rng: random.Random, work: Path) -> dict[str, Any]:
    """Interrupt one run, check what is left, rerun, check again."""
    target = work / f"{op}-out"
    shutil.rmtree(target, ignore_errors=True)
    cmd = bench.command(op, target)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    if rng.random() < 0.5:  # any moment
        time.sleep(rng.uniform(0, bench.seconds[op]))
    else:  # while writing: once its temporary folder exists, within the next second
        while process.poll() is None and not marks(target):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.0))
    killed = process.poll() is None
    writing = killed and bool(marks(target))
    if killed:
        process.send_signal(SIGNALS[name])
    _, stderr = process.communicate()
    problems = []
    code = process.returncode
    # a signal in the interpreter's own start-up, before mergecli's handlers exist, ends the
    # process silently (exit -signal): allowed, since nothing can have been written yet
    early = killed and name != "SIGKILL" and code == -SIGNALS[name] and not stderr.strip()
    early = early and not marks(target)
    early = early and (op == "temporal" or not target.exists())  # a state exists beforehand
    if killed and code not in (0, EXIT[name]) and not early:
        problems.append(f"exit {code} after {name}: {stderr.strip()[-300:]}")
    if killed and name != "SIGKILL" and code != 0 and len(stderr.strip().splitlines()) > 1:
        problems.append(f"{name}: more than one line: {stderr.strip()[-300:]}")
    if name != "SIGKILL" and marks(target):
        problems.append(f"{name} left {marks(target)}")
    checked = looks_complete(op, target)
    if checked and not same(op, target, bench.reference[op]):
        problems.append("an output that looks complete differs from the uninterrupted run's")
    left_by_kill = len(marks(target))
    again = run(bench.command(op, target, *(["--force"] if op != "temporal" else [])))
    if again.returncode != 0:
        problems.append(f"next run failed: {again.stderr.strip()[-300:]}")
    elif not same(op, target, bench.reference[op]):
        problems.append("the next run's output differs from the uninterrupted run's")
    leftovers = marks(target)
    if leftovers:
        problems.append(f"the next run left {leftovers}")
    return {
        "op": op,
        "signal": name,
        "killed": killed,
        "writing": writing,
        "before_start": early,
        "exit": code,
        "output_checked": checked,
        "left_by_kill": left_by_kill,
        "leftovers": len(leftovers),
        "problems": problems,
    }


def nan_expert(bench: Bench, work: Path) -> list[str]:
    poisoned = work / "nan"
    shutil.rmtree(poisoned, ignore_errors=True)
    shutil.copytree(bench.root / "e2", poisoned)
    file = poisoned / "model.safetensors"
    state = load_file(file)
    name = sorted(state)[3]
    state[name][0, 0] = float("nan")
    save_file(state, file)
    recipe = yaml.safe_load(bench.merge.read_text())
    recipe["models"][2]["model"] = str(poisoned)
    target = work / "nan-out"
    done = run(mergecli("merge", write_yaml(work / "nan.yaml", recipe), "--output", target))
    ok = done.returncode == 2 and name in done.stderr and str(file) in done.stderr
    ok = ok and not target.exists() and not marks(target)
    return [] if ok else [f"NaN expert: exit {done.returncode}: {done.stderr.strip()}"]


def concurrent(bench: Bench, work: Path) -> list[str]:
    problems = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for wait in (False, True):
        target = work / f"concurrent-{wait}"
        extra = ["--force", "--wait"] if wait else ["--force"]
        runs = [
            subprocess.Popen(
                bench.command("merge", target, *extra), env=env, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in runs]
        codes = sorted(code for code, _ in results)
        refused = [err for code, err in results if code == 2]
        fine = codes == [0, 0] if wait else codes in ([0, 0], [0, 2])
        if not fine or any("another mergecli run (pid" not in err for err in refused):
            problems.append(f"concurrent (wait={wait}): {results}")
        elif not same("merge", target, bench.reference["merge"]) or marks(target):
            problems.append(f"concurrent (wait={wait}): output differs or leftovers")
    return problems


def disk_full(bench: Bench, work: Path) -> tuple[str, list[str]]:
    """Mount a tmpfs a little larger than one merge's output (skipped where we cannot)."""
    mount = work / "tmpfs"
    mount.mkdir(exist_ok=True)
    need = sum(f.stat().st_size for f in bench.reference["merge"].glob("*.safetensors"))
    size = need + need // 2
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        return "skipped (cannot mount a tmpfs here)", []
    problems = []
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (size - need // 2))
        done = run(bench.command("merge", mount / "refused"))
        if done.returncode != 2 or "needs" not in done.stderr or marks(mount / "refused"):
            problems.append(f"free-space check: {done.returncode} {done.stderr.strip()}")
        filler.unlink()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        runs = [
            subprocess.Popen(
                bench.command("merge", mount / f"out{i}"),
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in runs]
        for i, (code, err) in enumerate(results):
            target = mount / f"out{i}"
            if code == 0 and not same("merge", target, bench.reference["merge"]):
                problems.append("disk full: a finished output differs")
            full = "No space left" in err or ("only" in err and "are free" in err)
            if code not in (0, 2) or (code == 2 and not full):
                problems.append(f"disk full: exit {code}: {err.strip()}")
            if code == 2 and (target.exists() or marks(target)):
                problems.append("disk full: a failed run left files")
        return f"ran on a {size}-byte tmpfs: exits {[c for c, _ in results]}", problems
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="mergecli-faults-") as scratch:
        root = Path(scratch)
        bench = Bench(root / "bench")
        work = root / "work"
        work.mkdir()
        extra = {"nan_expert": nan_expert(bench, work), "concurrent": concurrent(bench, work)}
        disk_note, extra["disk_full"] = disk_full(bench, work)
        if not args.json:
            print(f"NaN expert, concurrent runs, disk full ({disk_note}): {extra}", flush=True)
        rows: list[dict[str, Any]] = []
        stop = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for i in range(args.runs):
                op, name = OPERATIONS[i % len(OPERATIONS)], rng.choice(list(SIGNALS))
                rows.append(one_run(bench, op, name, rng, work))
                if not args.json:
                    row = rows[-1]
                    status = "ok" if not row["problems"] else "; ".join(row["problems"])
                    when = "writing" if row["writing"] else "killed" if row["killed"] else "ended"
                    print(f"{i + 1:3d} {op:8s} {name:7s} {when:8s} {status}", flush=True)
        except KeyboardInterrupt:  # Ctrl-C: the summary of the runs done so far
            print(f"stopped after {len(rows)} runs", flush=True)
        finally:
            signal.signal(signal.SIGINT, stop)
    kinds = Counter(f"{r['op']}/{r['signal']}" for r in rows if r["killed"])
    summary = {
        "runs": len(rows),
        "kills": sum(r["killed"] for r in rows),
        "kills_while_writing": sum(r["writing"] for r in rows),
        "kills_before_python_ran_mergecli": sum(r["before_start"] for r in rows),
        "kills_by_kind": dict(sorted(kinds.items())),
        "outputs_checked": sum(r["output_checked"] for r in rows),
        "temporary_folders_left_by_kill": sum(r["left_by_kill"] for r in rows),
        "leftovers_after_next_run": sum(r["leftovers"] for r in rows),
        "uninterrupted_seconds": {k: round(v, 2) for k, v in bench.seconds.items()},
        "disk_full": disk_note,
        "problems": [p for r in rows for p in r["problems"]]
        + [f"{k}: {p}" for k, ps in extra.items() for p in ps],
    }
    print(json.dumps(summary, indent=2))
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
