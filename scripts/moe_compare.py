"""Compare ``mergecli moe`` with mergekit-moe 0.1.5 on the same tiny Llama experts.

``python -m scripts.moe_compare [--mergekit-venv DIR] [--work DIR]``

mergekit runs from its own venv (installed on first use into ``.bench/mergekit-venv`` as
``scripts.bench_speed`` does; never the project's venv, never in CI). For each gate mode both
tools build a Mixtral of two experts from one base; both outputs are loaded with this checkout's
transformers and compared tensor by tensor, by their router rows (cosine: mergekit computes
``hidden`` states in bfloat16) and by their logits. Prompts have one token length, so mergekit's
padded batches hold no pad token. ``random`` gates are drawn by each tool's own generator, so
only the other tensors are compared. Prints a Markdown table (docs/moe.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from scripts.bench_speed import BENCH, MERGEKIT_VENV, ensure_mergekit
from scripts.fixtures import make_base, make_expert

PROMPTS = {
    "math": {"positive": ["w1 w2 w3", "w4 w5 w6"], "negative": ["w40 w41 w42"]},
    "code": {"positive": ["w20 w21 w22", "w23 w24 w25"]},
}
INPUT = torch.tensor([[1, 5, 9, 13, 17, 21, 30, 2]])
MODES = ("cheap_embed", "hidden", "random")


def mergekit_config(root: Path, mode: str) -> dict[str, Any]:
    experts = []
    for name, p in PROMPTS.items():
        expert: dict[str, Any] = {"source_model": str(root / name)}
        if mode != "random":
            expert["positive_prompts"] = p["positive"]
            if "negative" in p:
                expert["negative_prompts"] = p["negative"]
        experts.append(expert)
    return {
        "base_model": str(root / "base"),
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": experts,
    }


def mergecli_recipe(root: Path, mode: str) -> dict[str, Any]:
    moe: dict[str, Any] = {"experts_per_token": 2, "gate_mode": mode}
    if mode != "random":
        moe["prompts"] = PROMPTS
    return {
        "base_model": str(root / "base"),
        "models": [{"model": str(root / n), "name": n} for n in PROMPTS],
        "moe": moe,
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def compare(ours: Path, theirs: Path) -> dict[str, float]:
    a = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        sys.exit(f"tensor names differ: {sorted(set(sa) ^ set(sb))[:5]}")
    experts = other = router = 0.0
    cosine = 1.0
    for name, x in sa.items():
        diff = float((x - sb[name]).abs().max())
        if ".gate.weight" in name:
            router = max(router, diff)
            cos = torch.nn.functional.cosine_similarity(x.double(), sb[name].double(), dim=-1)
            cosine = min(cosine, float(cos.min()))
        elif ".experts." in name:
            experts = max(experts, diff)
        else:
            other = max(other, diff)
    with torch.no_grad():
        logits = float((a(input_ids=INPUT).logits - b(input_ids=INPUT).logits).abs().max())
    return {
        "experts": experts,
        "other": other,
        "router": router,
        "cosine": cosine,
        "logits": logits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    parser.add_argument("--work", type=Path, default=BENCH / "moe")
    args = parser.parse_args()
    exe = args.mergekit_venv / "bin" / "mergekit-moe"
    if not exe.exists():
        exe = ensure_mergekit().parent / "mergekit-moe"
    root = args.work
    if not (root / "base").exists():
        make_base(root / "base")
        for i, name in enumerate(PROMPTS):
            make_expert(root / "base", root / name, seed=200 + i)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    rows = []
    for mode in MODES:
        (root / f"{mode}.mergekit.yaml").write_text(yaml.safe_dump(mergekit_config(root, mode)))
        (root / f"{mode}.mergecli.yaml").write_text(yaml.safe_dump(mergecli_recipe(root, mode)))
        theirs, ours = root / f"out-mergekit-{mode}", root / f"out-mergecli-{mode}"
        mergekit_s = timed([str(exe), str(root / f"{mode}.mergekit.yaml"), str(theirs)], env)
        argv = [sys.executable, "-m", "mergecli", "moe", str(root / f"{mode}.mergecli.yaml")]
        mergecli_s = timed([*argv, "--output", str(ours), "--force", "--quiet"], env)
        rows.append((mode, compare(ours, theirs), mergecli_s, mergekit_s))
    print(
        "| gate mode | expert tensors max abs diff | other tensors max abs diff | router "
        "max abs diff | router rows min cosine | logits max abs diff | mergecli s | "
        "mergekit-moe s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, c, ours_s, theirs_s in rows:
        router = [f"{c['router']:.3g}", f"{c['cosine']:.6f}", f"{c['logits']:.3g}"]
        if mode == "random":  # each tool draws its own rows
            router = ["(own generators)", "–", "–"]
        cells = [mode, f"{c['experts']:.3g}", f"{c['other']:.3g}", *router]
        print(f"| {' | '.join(cells)} | {ours_s:.1f} | {theirs_s:.1f} |")


if __name__ == "__main__":
    main()
