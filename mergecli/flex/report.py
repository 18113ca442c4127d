"""FlexMerge's report per size: the merge order, the size reached, groups per block and a picture
(blocks × tasks, each cell coloured by the task's group in that block)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergecli.flex.order import Step

if TYPE_CHECKING:
    from mergecli.flex.plan import FlexPlan

REPORT = "flex_report.json"
PICTURE = "flex_report.png"


def group_grid(manifest: dict[str, Any]) -> list[list[int]]:
    """Per block, the index of each task's group (tasks in manifest order)."""
    tasks = manifest["tasks"]
    grid = []
    for block in manifest["blocks"]:
        row = [0] * len(tasks)
        for j, group in enumerate(block["groups"]):
            for task in group["tasks"]:
                row[tasks.index(task)] = j
        grid.append(row)
    return grid


def size_report(
    plan: FlexPlan,
    manifest: dict[str, Any],
    steps: list[Step],
    applied: int | None,
    grams: list[np.ndarray],
    timing: dict[str, float],
) -> dict[str, Any]:
    """The report of one size (``applied``: steps of the merge order it took)."""
    tasks = plan.tasks
    sizes = plan.sizes.sizes_along(steps, len(tasks))
    order = [
        {
            "step": i + 1,
            "block": plan.blocks[s.block].name,
            "a": [tasks[t] for t in s.a],
            "b": [tasks[t] for t in s.b],
            "similarity": s.similarity,
            "size_after": sizes[i + 1],
        }
        for i, s in enumerate(steps[: applied or 0])
    ]
    stored = manifest["stored_bytes"]
    return {
        "mergecli_flex_report": 1,
        "strategy": plan.options.strategy,
        "method": plan.merge.method.name,
        "tasks": tasks,
        "granularity": plan.options.granularity,
        "linkage": plan.options.linkage,
        "order": plan.options.order,
        "target": manifest["target"],
        "size": manifest["size"],
        "stored_bytes": stored,
        "model_bytes": manifest["model_bytes"],
        "steps_applied": applied,
        "steps_total": len(steps),
        "merge_order": order,
        "groups_per_block": [
            {"block": b["name"], "groups": len(b["groups"])} for b in manifest["blocks"]
        ],
        "groups": group_grid(manifest),
        "timing": timing,
    }


def write_size_report(folder: Path, report: dict[str, Any]) -> None:
    """``flex_report.json`` and the blocks × tasks picture ``flex_report.png``."""
    (folder / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(report["groups"])
    blocks = [b["block"] for b in report["groups_per_block"]]
    height = min(60.0, max(3.0, 0.18 * len(blocks) + 1.5))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(report["tasks"]) + 3.5), height))
    ax.imshow(grid, cmap="tab20", vmin=0, vmax=19, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(report["tasks"])), report["tasks"], rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), blocks, fontsize=6 if len(blocks) > 40 else 8)
    ax.set_title(
        f"FlexMerge ({report['method']}): size {report['size']:.3f} (target {report['target']:g})"
    )
    fig.tight_layout()
    fig.savefig(folder / PICTURE, dpi=100)
    plt.close(fig)
