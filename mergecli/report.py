"""Merge reports (JSON and Markdown) and the output's model card."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergecli.jsonsafe import strict_json

if TYPE_CHECKING:
    from mergecli.engine.plan import MergePlan


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_report(report: dict[str, Any]) -> str:
    """The human-readable merge report."""
    run, totals = report["run"], report["totals"]
    timing = run["timing"]
    lines = [
        f"# Merge report: `{report['method']}`",
        "",
        "| input | path | size | fingerprint |",
        "|---|---|---|---|",
        *(
            f"| {i['role']} | `{path}` | {human_bytes(i['bytes'])} | `{i['fingerprint']}` |"
            for i, path in zip(report["inputs"], run["inputs"], strict=True)
        ),
        "",
        f"Wall time {timing['wall_s']:.2f} s (busy: read {timing['read_s']:.2f} s, compute "
        f"{timing['compute_s']:.2f} s, write {timing['write_s']:.2f} s); read "
        f"{human_bytes(report['bytes_read'])}, wrote {human_bytes(report['bytes_written'])}, "
        f"peak resident memory {human_bytes(run['peak_rss_bytes'])}, device {run['device']}.",
        "",
    ]
    experts = [i["role"] for i in report["inputs"] if i["role"] != "base"]
    if "task_vector_norm" in totals:
        lines += [
            "| expert | ‖τ‖ | cos(τ, Δ) | kept | sign agreement |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {_fmt(totals['task_vector_norm'][t])} | "
                f"{_fmt(totals['cosine_to_delta'][t])} | {_fmt(totals['kept'][t])} | "
                f"{_fmt(totals['sign_agreement'][t])} |"
                for t, name in enumerate(experts)
            ),
            "",
            f"‖Δ‖ of the merged delta: {_fmt(totals['delta_norm'])} over "
            f"{totals['merged_parameters']} parameters in {totals['merged_tensors']} tensors.",
            "",
        ]
    if "artifact" in report:
        artifact = report["artifact"]
        lines += [
            "## Task-mask artifact",
            "",
            f"Tasks: {', '.join(artifact['tasks'])}. Size on disk: "
            f"{human_bytes(artifact['bytes'])} = {artifact['size_in_models']:.3f} models of "
            f"{human_bytes(artifact['model_bytes'])}. The cosine above is taken with the unified "
            "task vector.",
            "",
        ]
    if "lora" in report:
        lora = report["lora"]
        lines += [
            "## LoRA adapter",
            "",
            f"Saved whole (modules_to_save): {', '.join(lora['modules_to_save']) or 'none'}. "
            f"Lowest fraction of a merged delta's energy kept: {_fmt(lora['min_energy_kept'])}.",
            "",
            "| module | rank | exact | energy kept |",
            "|---|---|---|---|",
            *(
                f"| {name} | {m['rank']} | {'yes' if m['exact'] else 'no'} | "
                f"{_fmt(m['energy_kept'])} |"
                for name, m in lora["modules"].items()
            ),
            "",
        ]
    if report["plan"]["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in report["plan"]["warnings"]), ""]
    lines += [
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(report["recipe"], sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_reports(folder: Path, report: dict[str, Any]) -> None:
    """merge_report.json (strict JSON: a non-finite figure is null, with a warning) and .md."""
    text, notes = strict_json(report)
    if notes:
        report["plan"]["warnings"] += notes
        text = strict_json(report)[0]
    (folder / "merge_report.json").write_text(text + "\n")
    (folder / "merge_report.md").write_text(markdown_report(report))


def model_card(plan: MergePlan) -> str:
    """README.md with Hugging Face metadata: base_model, tags and the recipe."""
    recipe = plan.recipe.model_dump(mode="json", exclude={"folder"}, exclude_none=True)
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "mergecli"]}
    base = plan.recipe.base_model or (plan.base.origin if plan.base else None)
    if base:
        meta["base_model"] = base
    models = "\n".join(f"- `{m.model}`" for m in plan.recipe.models)
    title, what = "Merged model", "This model was merged"
    if plan.lora is not None:
        meta["library_name"] = "peft"
        title = "Merged LoRA adapter"
        what = (
            "This LoRA adapter holds the merged model's change of the base "
            "(`PeftModel.from_pretrained(base, FOLDER)` loads it). It was merged"
        )
    if plan.artifact is not None:
        tasks = ", ".join(plan.artifact.tasks)
        title = "Task-mask artifact"
        what = (
            "This folder is not one model: it holds the base, a unified task vector and one-bit "
            f"masks per task (tasks: {tasks}); `mergecli export FOLDER --task NAME --output DIR` "
            "writes one task's model. It was made"
        )
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {title}\n\n{what} with mergecli "
        f"using `{plan.method.name}`: {plan.method.summary}.\n\n"
        f"Base model: `{base or 'none'}`\n\nExperts:\n{models}\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )
