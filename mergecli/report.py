"""Merge reports (JSON and Markdown) and the output's model card."""

from __future__ import annotations

from collections.abc import Sequence
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


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_report(report: dict[str, Any], sections: Sequence[str] = ()) -> str:
    """The human-readable merge report; ``sections``: the output's Markdown lines."""
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
                f"| {name} | {fmt(totals['task_vector_norm'][t])} | "
                f"{fmt(totals['cosine_to_delta'][t])} | {fmt(totals['kept'][t])} | "
                f"{fmt(totals['sign_agreement'][t])} |"
                for t, name in enumerate(experts)
            ),
            "",
            f"‖Δ‖ of the merged delta: {fmt(totals['delta_norm'])} over "
            f"{totals['merged_parameters']} parameters in {totals['merged_tensors']} tensors.",
            "",
        ]
    lines += list(sections)
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


def write_reports(folder: Path, report: dict[str, Any], sections: list[str]) -> None:
    """merge_report.json (strict JSON: a non-finite figure is null, with a warning) and .md."""
    text, notes = strict_json(report)
    if notes:
        report["plan"]["warnings"] += notes
        text = strict_json(report)[0]
    (folder / "merge_report.json").write_text(text + "\n")
    (folder / "merge_report.md").write_text(markdown_report(report, sections))


def model_card(plan: MergePlan) -> str:
    """README.md with Hugging Face metadata: base_model, tags and the recipe."""
    recipe = plan.recipe.model_dump(mode="json", exclude={"folder"}, exclude_none=True)
    card = plan.output.card
    meta: dict[str, Any] = {"library_name": card.library, "tags": ["merge", "mergecli"]}
    base = plan.recipe.base_model or (plan.base.origin if plan.base else None)
    if base:
        meta["base_model"] = base
    listed = [m.model for m in plan.recipe.models] + [
        f"{s.model} layers {s.layer_range[0]}–{s.layer_range[1] - 1}"
        for part in plan.recipe.slices or []
        for s in part.sources
    ]
    models = "\n".join(f"- `{m}`" for m in listed)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {card.title}\n\n{card.what} with mergecli "
        f"using `{plan.method.name}`: {plan.method.summary}.\n\n"
        f"Base model: `{base or 'none'}`\n\nExperts:\n{models}\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )
