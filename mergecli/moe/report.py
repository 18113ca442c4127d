"""The MoE output's report and model card: ``moe_report.md`` and ``README.md`` from the report
dictionary, and the routers' figures of a sparse MoE."""

from __future__ import annotations

from typing import Any

import torch
import yaml

from mergecli.moe.arrow import peft_recipe
from mergecli.moe.plan import MoePlan
from mergecli.report import human_bytes


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
