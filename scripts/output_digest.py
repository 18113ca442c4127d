"""Digests of what representative recipes write, to check that a refactor changes no output.

``python -m scripts.output_digest FIXTURES [--out DIGESTS.txt]`` builds the tiny fixtures in
FIXTURES (once; reused afterwards), runs every method family, the LoRA and task-mask outputs,
FlexMerge, ``analyze interference``, an in-memory merge, a temporal replay, ``export`` of
artifacts' tasks and ``moe`` (sparse, trained and Arrow) through the library, and prints one
line per output file: its path and the sha256 of its bytes (reports and manifests without their
timing and memory fields). Two checkouts that print the same lines write the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from scripts.fixtures import make_adapter, make_base, make_expert

VOLATILE = {
    "timing",
    "threads",
    "peak_rss_bytes",
    "peak_memory_estimate",
    "throughput_bytes_per_s",
    "started",
}
"""Report keys that measure the run rather than describe the output."""

RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"merge_method": "linear", "models": "abc", "parameters": {"weight": 1.0}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.7}},
    "ties_model": {"merge_method": "ties", "parameters": {"density": 0.3}},
    "ties_tensor": {"merge_method": "ties", "parameters": {"density": 0.3, "scope": "tensor"}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5}, "seed": 7},
    "dare_linear": {"merge_method": "dare_linear", "parameters": {"density": 0.6}, "seed": 3},
    "breadcrumbs": {"merge_method": "breadcrumbs", "parameters": {"density": 0.8}},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "parameters": {"density": 0.8}},
    "della": {"merge_method": "della", "parameters": {"density": 0.5}, "seed": 1},
    "magmax": {"merge_method": "magmax"},
    "slerp": {"merge_method": "slerp", "models": "ab", "parameters": {"t": 0.3}},
    "model_stock": {"merge_method": "model_stock"},
    "lines": {"merge_method": "lines", "parameters": {"alpha": 0.5, "beta": 0.5}},
    "pcb": {"merge_method": "pcb"},
    "tsv": {"merge_method": "tsv"},
    "consensus": {"merge_method": "consensus"},
    "tall_masks": {"merge_method": "tall_masks"},
    "emr": {"merge_method": "emr"},
    "lora_svd": {"merge_method": "ties", "output_format": "lora", "rank": 4},
    "lora_exact": {"merge_method": "task_arithmetic", "output_format": "lora", "models": "LM"},
    "bf16_out": {"merge_method": "task_arithmetic", "out_dtype": "bfloat16", "models": "ab"},
}
"""Recipes by name; ``models`` lists fixture letters (a, b, c experts; L, M LoRA adapters)."""

CHUNKED = ("task_arithmetic", "ties_model", "ties_tensor", "dare_ties", "tall_masks", "lora_svd")
"""Recipes run a second time with row chunks of 512 entries (the engine's chunked path)."""


def build_fixtures(root: Path) -> None:
    if (root / "done").is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    base = make_base(root / "base")
    for i, letter in enumerate("abc"):
        make_expert(base, root / letter, seed=100 + i)
    for i, letter in enumerate("LM"):
        config = LoraConfig(r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        make_adapter(base, root / letter, config, seed=200 + i)
    (root / "done").write_text("")


def arrow_adapters(root: Path) -> list[Path]:
    """Three LoRA adapters of one rank for an Arrow MoE (built once, beside the fixtures)."""
    folders = [root / "arrow" / x for x in ("X", "Y", "G")]
    if not (root / "arrow" / "done").is_file():
        shutil.rmtree(root / "arrow", ignore_errors=True)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        for i, folder in enumerate(folders):
            make_adapter(root / "base", folder, config, seed=300 + i, scale=0.3)
        (root / "arrow" / "done").write_text("")
    return folders


def train_texts(root: Path) -> Path:
    """Training texts of tasks a and b for a trained MoE (``{task}`` in the returned path)."""
    for i, task in enumerate("ab"):
        lines = [" ".join(f"w{(5 * k + j + 20 * i) % 61}" for j in range(8)) for k in range(10)]
        (root / "train" / task).mkdir(parents=True, exist_ok=True)
        (root / "train" / task / "texts.txt").write_text("\n".join(lines) + "\n")
    return root / "train" / "{task}" / "texts.txt"


def recipe(root: Path, spec: dict[str, Any]) -> Any:
    from mergecli.recipe import recipe_from_dict

    spec = dict(spec)
    letters = spec.pop("models", "abc")
    body = {
        "base_model": str(root / "base"),
        "models": [{"model": str(root / x), "name": x} for x in letters],
        "dtype": "float32",
        **spec,
    }
    return recipe_from_dict(body, root)


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE and k != "wall_s"}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    elif path.name.endswith("report.md"):
        data = b"\n".join(x for x in data.split(b"\n") if b"Wall time" not in x)
    elif path.suffix == ".png":
        return "(figure)"
    return hashlib.sha256(data).hexdigest()[:16]


def folder_digests(label: str, folder: Path) -> Iterator[str]:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        yield f"{label}/{path.relative_to(folder)} {file_digest(path)}"


def set_chunk(elements: int) -> None:
    """Row chunks of ``elements`` entries wherever the engine keeps that constant."""
    import importlib

    for name in ("mergecli.engine.plan", "mergecli.engine.read_plan"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "CHUNK_ELEMENTS"):
            module.CHUNK_ELEMENTS = elements


def digests(root: Path, work: Path) -> Iterator[str]:
    import mergecli
    from mergecli.analyze.interference import analyze_interference
    from mergecli.engine.merge import merge_state
    from mergecli.flex.plan import plan_flex
    from mergecli.flex.run import run_flex
    from mergecli.temporal.replay import replay

    shutil.rmtree(work, ignore_errors=True)
    for chunk in (None, 512):
        names = list(RECIPES) if chunk is None else list(CHUNKED)
        if chunk:
            set_chunk(chunk)
        for name in names:
            label = name if chunk is None else f"{name}@chunk{chunk}"
            plan = mergecli.plan_merge(recipe(root, RECIPES[name]))
            mergecli.run_merge(plan, work / label)
            yield from folder_digests(label, work / label)
        set_chunk(1 << 20)
    state = merge_state(mergecli.plan_merge(recipe(root, RECIPES["ties_model"])))
    for key in sorted(state):
        raw = state[key].contiguous().view(torch.uint8).numpy().tobytes()
        yield f"memory/{key} {hashlib.sha256(raw).hexdigest()[:16]}"
    for strategy, sizes in (("flexmerge", [1.5, 2.5]), ("channel", [2])):
        spec = recipe(root, {"merge_method": "ties", "parameters": {"density": 0.4}})
        run_flex(plan_flex(spec, {"sizes": sizes, "strategy": strategy}), work / strategy)
        yield from folder_digests(f"flex-{strategy}", work / strategy)
    masks = recipe(root, {"merge_method": "tall_masks"})
    run_flex(plan_flex(masks, {"sizes": [2.5]}), work / "flex-masks")
    yield from folder_digests("flex-masks", work / "flex-masks")
    figures = analyze_interference(recipe(root, RECIPES["task_arithmetic"]))
    yield f"interference {hashlib.sha256(json.dumps(scrub(figures)).encode()).hexdigest()[:16]}"
    temporal = recipe(
        root,
        {
            "merge_method": "dare_linear",
            "parameters": {"density": 0.6},
            "temporal": {"ema_weight": 0.5},
            "output": str(work / "temporal"),
        },
    )
    replay(temporal)
    yield from folder_digests("temporal", work / "temporal")
    yield from export_and_moe(root, work)


def export_and_moe(root: Path, work: Path) -> Iterator[str]:
    """Tasks exported from the task-mask and FlexMerge artifacts above; sparse MoE models
    (random and cheap_embed gates, shared tensors merged, routers and experts trained) and an
    Arrow MoE with GenKnowSub."""
    from mergecli.artifacts import open_artifact
    from mergecli.artifacts.export import export_task
    from mergecli.moe import plan_moe, run_moe

    for artifact, task in (("tall_masks", "b"), ("flexmerge/size-1.5", "c")):
        label = f"export-{artifact.split('/')[0]}"
        export_task(open_artifact(work / artifact), task, work / label, shard_size="200KB")
        yield from folder_digests(label, work / label)
    prompts = {x: {"positive": [f"w{i} w{i + 1}"], "negative": ["w40"]} for i, x in enumerate("ab")}
    x, y, g = arrow_adapters(root)
    specs: dict[str, dict[str, Any]] = {
        "moe-random": {"models": "ab", "moe": {"gate_mode": "random"}},
        "moe-cheap": {"models": "ab", "moe": {"gate_mode": "cheap_embed", "prompts": prompts}},
        "moe-merged": {
            "models": "ab",
            "merge_method": "task_arithmetic",
            "out_dtype": "bfloat16",
            "moe": {"gate_mode": "random"},
        },
        "moe-trained": {
            "models": "ab",
            "moe": {
                "gate_mode": "random",
                "train_data": str(train_texts(root)),
                "train_steps": 3,
                "lr": 0.01,
                "batch_size": 4,
            },
        },
    }
    for label, spec in specs.items():
        run_moe(plan_moe(recipe(root, {**spec, "seed": 5}), shard_size="200KB"), work / label)
        yield from folder_digests(label, work / label)
    from mergecli.recipe import recipe_from_dict

    arrow = {
        "base_model": str(root / "base"),
        "models": [{"model": str(x)}, {"model": str(y)}],
        "moe": {"top_k": 2, "general": [str(g)]},
        "seed": 5,
    }
    run_moe(plan_moe(recipe_from_dict(arrow, root)), work / "moe-arrow")
    yield from folder_digests("moe-arrow", work / "moe-arrow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fixtures", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = args.fixtures.resolve()
    build_fixtures(root)
    lines = list(digests(root, root.parent / f"{root.name}-outputs"))
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
