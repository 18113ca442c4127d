"""SHA-256 of every file that ``moe`` (sparse and Arrow) and ``export`` write, for tiny fixtures.

Run it with two versions of the code on the same folder and compare the JSON it prints: the
outputs must be byte-identical. Reports drop their timing and memory keys first.

    PYTHONPATH=OLD python -m scripts.output_digests /tmp/digests > old.json
    PYTHONPATH=NEW python -m scripts.output_digests /tmp/digests > new.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from peft import LoraConfig

import mergecli
from mergecli.artifacts import open_artifact
from mergecli.artifacts.export import export_task
from mergecli.moe import plan_moe, run_moe
from mergecli.recipe import recipe_from_dict
from scripts.fixtures import make_adapter, make_base, make_expert

VOLATILE = {"wall_s", "peak_rss_bytes", "run"}
PROMPTS = {"a": {"positive": ["w1 w2 w3"], "negative": ["w40"]}, "b": {"positive": ["w20 w21"]}}


def fixtures(root: Path) -> Path:
    """A base, two experts and two LoRA adapters (built once, reused by both runs)."""
    done = root / "fixtures" / ".done"
    if done.exists():
        return root / "fixtures"
    zoo = root / "fixtures"
    shutil.rmtree(zoo, ignore_errors=True)
    base = make_base(zoo / "base")
    for i, name in enumerate(("a", "b", "c")):
        make_expert(base, zoo / name, seed=40 + i)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    for i, name in enumerate(("la", "lb", "lg")):
        make_adapter(base, zoo / name, config, seed=50 + i, scale=0.3)
    done.touch()
    return zoo


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith("report.json"):
            report = {k: v for k, v in json.loads(data).items() if k not in VOLATILE}
            data = json.dumps(report, sort_keys=True).encode()
        elif path.name.endswith("report.md") and path.name.startswith("moe"):
            data = b"\n".join(line for line in data.splitlines() if b"Wall time" not in line)
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def moe(zoo: Path, out: Path, **spec: Any) -> None:
    recipe = recipe_from_dict({"base_model": str(zoo / "base"), "seed": 5, **spec})
    run_moe(plan_moe(recipe, shard_size="200KB"), out, force=True)


def main() -> None:
    root = Path(sys.argv[1])
    zoo = fixtures(root)
    outs = root / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    experts = [{"model": str(zoo / n), "name": n} for n in ("a", "b")]
    moe(zoo, outs / "sparse-random", models=experts, moe={"gate_mode": "random"})
    moe(
        zoo,
        outs / "sparse-cheap",
        models=experts,
        moe={"gate_mode": "cheap_embed", "prompts": PROMPTS},
    )
    moe(
        zoo,
        outs / "sparse-merged",
        models=experts,
        merge_method="task_arithmetic",
        out_dtype="bfloat16",
        moe={"gate_mode": "random"},
    )
    adapters = [{"model": str(zoo / n)} for n in ("la", "lb")]
    moe(zoo, outs / "arrow", models=adapters, moe={"top_k": 2, "general": [str(zoo / "lg")]})
    tall = recipe_from_dict(
        {
            "merge_method": "tall_masks",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n), "name": n} for n in ("a", "b", "c")],
        }
    )
    artifact = outs / ".tall"
    mergecli.run_merge(mergecli.plan_merge(tall), artifact, force=True)
    export_task(open_artifact(artifact), "b", outs / "export-tall", shard_size="300KB")
    result = {
        folder.name: digests(folder)
        for folder in sorted(outs.iterdir())
        if not folder.name.startswith(".")
    }
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
