"""Write an MoE plan's output folder: atomic, shard by shard, with manifest, report and card.

Arrow output: ``experts/<name>/`` and ``general/<name>/`` (the adapters in peft's layout),
``moe.json`` (the manifest ``mergecli.moe.load`` reads). Sparse output: a transformers model
folder (config, sharded safetensors, tokenizer) plus ``moe.json``. Both: ``moe_report.json``,
``moe_report.md`` and ``README.md``.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergecli.engine.layout import Shard
from mergecli.engine.output import atomic_folder, check_output
from mergecli.engine.writer import ShardWriter
from mergecli.moe.arrow import ArrowAdapter, layer_summary, module_stats, peft_recipe
from mergecli.moe.gates import gate_rows
from mergecli.moe.load import MANIFEST
from mergecli.moe.plan import MoePlan
from mergecli.moe.sparse import Copy
from mergecli.progress import NullProgress, Progress
from mergecli.report import human_bytes
from mergecli.sources.adapter import ADAPTER_CONFIG
from mergecli.sources.checkpoint import CONFIG_FILES, INDEX_NAME, TOKENIZER_FILES, Checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class MoeResult:
    folder: Path
    report: dict[str, Any]


def run_moe(
    plan: MoePlan, output: str | Path, force: bool = False, progress: Progress | None = None
) -> MoeResult:
    """Write the planned MoE into ``output`` (replaced only with ``force``)."""
    output = Path(output)
    check_output(output, force)
    progress = progress or NullProgress()
    start = time.perf_counter()
    try:
        with atomic_folder(output, force) as folder:
            report = (_write_arrow if plan.kind == "arrow" else _write_sparse)(
                plan, folder, progress
            )
            report |= {
                "output": str(output),
                "kind": plan.kind,
                "plan": plan.summary(),
                "recipe": plan.recipe.model_dump(
                    mode="json", exclude={"folder"}, exclude_none=True
                ),
                "wall_s": time.perf_counter() - start,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
            (folder / "moe_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (folder / "moe_report.md").write_text(markdown_report(report))
            (folder / "README.md").write_text(model_card(plan, report))
    finally:
        progress.stop()
    return MoeResult(output, report)


def copy_adapter(adapter: ArrowAdapter, folder: Path, progress: Progress) -> int:
    """The adapter's config and tensors into ``folder`` (peft's layout); bytes written."""
    folder.mkdir(parents=True)
    shutil.copyfile(adapter.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    names = adapter.weights.tensor_names()
    infos = [adapter.weights.info(n) for n in names]
    shard = Shard(ADAPTER_WEIGHTS, names, [i.shape for i in infos], [i.dtype for i in infos])
    writer = ShardWriter(folder, [shard])
    for name, info in zip(names, infos, strict=True):
        writer.write(name, adapter.weights.read(name))
        progress.advance(1, info.nbytes)
    writer.finish()
    return writer.bytes_written


def _write_arrow(plan: MoePlan, folder: Path, progress: Progress) -> dict[str, Any]:
    everyone = [*plan.adapters, *plan.general]
    nbytes = sum(a.weights.nbytes for a in everyone)
    progress.start("Arrow prototypes", len(plan.modules), nbytes)
    stats = []
    for module in plan.modules:
        stats.append(module_stats(plan.adapters, plan.general, module))
        progress.advance(1, 0)
    tensors = sum(len(a.weights.tensor_names()) for a in everyone)
    progress.start("copy adapters", tensors, nbytes)
    written = 0
    for adapter in plan.adapters:
        written += copy_adapter(adapter, folder / "experts" / adapter.name, progress)
    for adapter in plan.general:
        written += copy_adapter(adapter, folder / "general" / adapter.name, progress)
    manifest = {
        "format": "mergecli-moe",
        "version": 1,
        "kind": "arrow",
        "base_model": plan.base.origin or str(plan.base.path),
        "experts": [f"experts/{a.name}" for a in plan.adapters],
        "general": [f"general/{a.name}" for a in plan.general],
        "arrow_config": plan.arrow_config(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {
        "manifest": manifest,
        "layers": layer_summary(stats),
        "modules": [s.summary() for s in stats],
        "bytes_read": nbytes * 2,
        "bytes_written": written,
    }


def _gates(plan: MoePlan, progress: Progress) -> torch.Tensor:
    config = plan.config
    rows = len(plan.experts) + (plan.shared is not None)
    progress.start(f"{plan.section.gate_mode} gates", config.num_hidden_layers, 0)
    gates = gate_rows(
        plan.section.gate_mode,
        plan.base,
        plan.prompts,
        config.num_hidden_layers,
        config.hidden_size,
        rows,
        plan.recipe.seed,
    )
    progress.advance(config.num_hidden_layers, 0)
    return gates


def _train(plan: MoePlan, folder: Path, progress: Progress) -> dict[str, Any]:
    """Train routers and experts in place; the folder is rewritten by ``save_pretrained`` (in
    the layout this transformers version saves) in the output dtype."""
    from mergecli.moe.train import train

    s = plan.section
    model, report = train(
        folder,
        plan.train_files,
        s.train_steps,
        s.lr,
        s.batch_size,
        plan.recipe.seed,
        plan.device,
        progress,
    )
    for old in [*folder.glob("*.safetensors"), folder / INDEX_NAME]:
        old.unlink(missing_ok=True)
    biggest = max(shard.nbytes for shard in plan.shards)
    model.to(plan.out_dtype).save_pretrained(folder, max_shard_size=max(biggest, 1 << 20))
    return report


def gate_report(gates: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer: the routers' pairwise cosines and condition number (mergekit-moe warns
    above 5: prompts too similar, experts underused)."""
    rows = []
    for layer, g in enumerate(gates.to(torch.float64)):
        unit = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        rows.append(
            {
                "layer": layer,
                "cosine": (unit @ unit.T).tolist(),
                "condition_number": float(torch.linalg.cond(g)),
            }
        )
    return rows


def _write_sparse(plan: MoePlan, folder: Path, progress: Progress) -> dict[str, Any]:
    base = plan.base
    merged: dict[str, Any] | None = None
    if plan.merge is not None:  # the tensors outside the experts: merged, written aside first
        from mergecli.engine.merge import run_merge

        result = run_merge(plan.merge, folder / ".shared", progress=progress)
        merged = {k: result.report[k] for k in ("method", "totals") if k in result.report}
        base = Checkpoint(folder / ".shared", "merged shared tensors")
    gates = _gates(plan, progress)
    experts = len(plan.experts)
    total = sum(s.nbytes for s in plan.shards)
    progress.start("write experts", len(plan.entries), total)
    writer = ShardWriter(folder, plan.shards)
    read = 0
    for entry in plan.entries:
        if isinstance(entry, Copy):
            source = base if entry.source == -1 else plan.source(entry.source)
            tensor = source.read(entry.name)
            read += tensor.nbytes
        else:
            tensor = gates[entry.layer, experts:] if entry.shared else gates[entry.layer, :experts]
        out = tensor.to(plan.out_dtype)
        writer.write(entry.out, out)
        progress.advance(1, out.nbytes)
    writer.finish()
    shutil.rmtree(folder / ".shared", ignore_errors=True)
    plan.config.save_pretrained(folder)
    tokenizer: Path = plan.base.path
    if plan.recipe.tokenizer_source and plan.recipe.tokenizer_source != "base":
        tokenizer = plan.recipe.resolve_path(plan.recipe.tokenizer_source)
    sources: tuple[tuple[Path, tuple[str, ...]], ...] = (
        (plan.base.path, tuple(CONFIG_FILES[1:])),
        (tokenizer, tuple(TOKENIZER_FILES)),
    )
    for origin, names in sources:
        for name in names:
            if (origin / name).is_file():
                shutil.copyfile(origin / name, folder / name)
    training = _train(plan, folder, progress) if plan.section.train_steps else None
    manifest = {
        "format": "mergecli-moe",
        "version": 1,
        "kind": "sparse",
        "base_model": plan.base.origin or str(plan.base.path),
        "architecture": plan.config.architectures[0],
        "experts": plan.names,
        "top_k": plan.section.top_k,
        "gate_mode": plan.section.gate_mode,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report: dict[str, Any] = {
        "manifest": manifest,
        "gates": gate_report(gates[:, :experts]),
        "bytes_read": read,
        "bytes_written": writer.bytes_written,
    }
    if merged:
        report["shared_merge"] = merged
    if training:
        report["training"] = training
    bad = [r["layer"] for r in report["gates"] if r["condition_number"] > 5]
    if bad and plan.section.gate_mode != "random":
        report["warnings"] = [
            f"layers {bad}: router rows are nearly dependent (condition number > 5); the "
            "prompts may be too similar and some experts underused"
        ]
    return report


def markdown_report(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = [
        f"# MoE report: {report['kind']}",
        "",
        f"Experts: {', '.join(plan['experts'])}; top k = {plan['top_k']}. Wall time "
        f"{report['wall_s']:.2f} s, read {human_bytes(report['bytes_read'])}, wrote "
        f"{human_bytes(report['bytes_written'])}, peak resident memory "
        f"{human_bytes(report['peak_rss_bytes'])}.",
        "",
    ]
    names = list(plan["experts"])
    if report["kind"] == "arrow":
        lines += [
            "Per layer, over its routed modules: the mean |cosine| between two experts' Arrow "
            "prototypes (first right-singular vectors of s·B·A, after GenKnowSub when general "
            "adapters are given), and each expert's singular-value share σ1²/Σσi² (how much "
            "of its B·A the prototype's direction explains).",
            "",
            f"| layer | modules | mean abs cosine | {' | '.join(names)} |",
            f"|---|---|---|{'---|' * len(names)}",
            *(
                f"| {r['layer']} | {r['modules']} | {_fmt(r['mean_abs_cosine'])} | "
                + " | ".join(_fmt(s) for s in r["singular_value_share"])
                + " |"
                for r in report["layers"]
            ),
            "",
        ]
    else:
        lines += [
            f"Architecture {report['manifest']['architecture']}, gate mode "
            f"{report['manifest']['gate_mode']}.",
            "",
            "| layer | router condition number | mean cosine between router rows |",
            "|---|---|---|",
        ]
        for r in report["gates"]:
            n = len(r["cosine"])
            off = [r["cosine"][i][j] for i in range(n) for j in range(n) if i != j]
            mean = sum(off) / len(off) if off else None
            lines.append(f"| {r['layer']} | {_fmt(r['condition_number'])} | {_fmt(mean)} |")
        lines.append("")
    if "training" in report:
        t = report["training"]
        loss = t["loss"]
        marks = sorted({0, len(loss) // 4, len(loss) // 2, 3 * len(loss) // 4, len(loss) - 1})
        lines += [
            "## Training of routers and experts",
            "",
            f"{t['steps']} steps, lr {t['lr']}, batch {t['batch_size']}, seed {t['seed']}, on "
            f"{t['device']}; {t['examples']} examples of {', '.join(t['tasks'])}; "
            f"{t['trained_parameters']} parameters trained, {t['frozen_parameters']} frozen.",
            "",
            "| step | loss |",
            "|---|---|",
            *(f"| {i + 1} | {loss[i]:.4f} |" for i in marks),
            "",
        ]
    warnings = report.get("warnings", []) + plan["warnings"]
    if warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in warnings), ""]
    recipe = yaml.safe_dump(report["recipe"], sort_keys=False).strip()
    return "\n".join([*lines, "## Recipe", "", "```yaml", recipe, "```", ""])


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def model_card(plan: MoePlan, report: dict[str, Any]) -> str:
    """README.md: Hugging Face metadata, how to load the folder, and the recipe."""
    base = plan.base.origin or str(plan.base.path)
    meta: dict[str, Any] = {"base_model": base, "tags": ["moe", "merge", "mergecli"]}
    experts = "\n".join(f"- `{name}`: `{path}`" for name, path in plan.summary()["experts"].items())
    if plan.kind == "arrow":
        meta["library_name"] = "peft"
        manifest = report["manifest"]
        code = peft_recipe(manifest["experts"], manifest["general"], manifest["arrow_config"])
        what = (
            "an Arrow mixture of LoRA experts (peft): in every adapted linear layer each token "
            "is routed to its top-k experts by the absolute dot product of its hidden state with "
            "each expert's prototype (the first right-singular vector of B·A)"
        )
        load = (
            "`mergecli.moe.load(FOLDER, base)` returns the peft model; in plain peft, with "
            f"FOLDER this folder and BASE the base model:\n\n```python\n{code}\n```"
        )
    else:
        meta["library_name"] = "transformers"
        what = (
            f"a sparse mixture of experts ({plan.config.architectures[0]}): each expert's MLP "
            f"is one MoE expert, {plan.section.top_k} routed per token, router initialised "
            f"with gate mode `{plan.section.gate_mode}`"
        )
        load = "`AutoModelForCausalLM.from_pretrained(FOLDER)` loads it."
    recipe = plan.recipe.model_dump(mode="json", exclude={"folder"}, exclude_none=True)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# Mixture of experts\n\n"
        f"This folder is {what}. It was made with mergecli from base `{base}` and the "
        f"experts:\n\n{experts}\n\n## Loading\n\n{load}\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )
