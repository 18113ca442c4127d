"""FlexMerge's report per size: the merge order, the size reached, groups per block and a picture
(blocks × tasks, each cell coloured by the task's group in that block)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergecli.flex.order import Step
from mergecli.jsonsafe import strict_json

if TYPE_CHECKING:
    from mergecli.flex.plan import FlexPlan
    from mergecli.flex.run import FlexResult

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


def order_rows(plan: FlexPlan, steps: list[Step]) -> list[dict[str, Any]]:
    """The merge order as a table: step, block, the two groups, their similarity, the size
    after the step."""
    tasks = plan.tasks
    sizes = plan.sizes.sizes_along(steps, len(tasks))
    return [
        {
            "step": i + 1,
            "block": plan.blocks[s.block].name,
            "a": [tasks[t] for t in s.a],
            "b": [tasks[t] for t in s.b],
            "similarity": s.similarity,
            "size_after": sizes[i + 1],
        }
        for i, s in enumerate(steps)
    ]


def size_report(
    plan: FlexPlan,
    manifest: dict[str, Any],
    rows: list[dict[str, Any]],
    applied: int | None,
    timing: dict[str, float],
) -> dict[str, Any]:
    """The report of one size (``applied``: steps of the merge order it took)."""
    tasks = plan.tasks
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
        "size_unit": manifest["size_unit"],
        "stored_bytes": stored,
        "sized_bytes": manifest["sized_bytes"],
        "model_bytes": manifest["model_bytes"],
        "heads": list(manifest["heads"]),
        "steps_applied": applied,
        "steps_total": len(rows),
        "merge_order": rows[: applied or 0],
        "groups_per_block": [
            {"block": b["name"], "groups": len(b["groups"])} for b in manifest["blocks"]
        ],
        "groups": group_grid(manifest),
        "timing": timing,
    }


def colours(groups: list[list[int]]) -> np.ndarray:
    """Group j → a tab20 index: the ten strong colours first, then their light companions."""
    grid = np.asarray(groups)
    return (2 * grid) % 20 + (grid // 10) % 2


def write_size_reports(items: list[tuple[Path, dict[str, Any]]]) -> None:
    """``flex_report.json`` and the blocks × tasks picture ``flex_report.png`` in each folder
    (one figure redrawn per size: the labels are laid out once)."""
    for folder, report in items:
        (folder / REPORT).write_text(strict_json(report, indent=1)[0] + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = items[0][1]
    blocks = [b["block"] for b in first["groups_per_block"]]
    tasks = first["tasks"]
    label = max(len(b) for b in blocks) * 0.055 + 0.3  # inches of the block names
    width = label + max(2.5, 0.35 * len(tasks) + 0.8)
    height = min(60.0, max(3.0, 0.16 * len(blocks) + 1.4))
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(
        left=label / width, right=1 - 0.15 / width, bottom=0.6 / height, top=1 - 0.45 / height
    )
    image = ax.imshow(
        colours(first["groups"]),
        cmap="tab20",
        vmin=0,
        vmax=19,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
    title = fig.text(0.02, 1 - 0.12 / height, "", fontsize=9, va="top")
    image.set_visible(False)
    fig.canvas.draw()  # labels and frame once; each size redraws only its grid and title
    background = fig.canvas.copy_from_bbox(fig.bbox)  # type: ignore[attr-defined]
    image.set_visible(True)
    for folder, report in items:
        fig.canvas.restore_region(background)  # type: ignore[attr-defined]
        image.set_data(colours(report["groups"]))
        title.set_text(
            f"{report['method']}: size {report['size']:.3f} (target {report['target']:g})"
        )
        ax.draw_artist(image)
        fig.draw_artist(title)
        plt.imsave(folder / PICTURE, np.asarray(fig.canvas.buffer_rgba()))  # type: ignore[attr-defined]
    plt.close(fig)


def result_summary(result: FlexResult) -> dict[str, Any]:
    """What ``run_flex`` wrote, in short: per size its folder, bytes, steps and groups per
    block, and the merge order."""
    return {
        "output": str(result.output),
        "timing": result.timing,
        "sizes": [
            {
                "target": r.target,
                "size": r.size,
                "folder": str(r.folder),
                "size_unit": r.report["size_unit"],
                "stored_bytes": r.report["stored_bytes"],
                "steps_applied": r.report["steps_applied"],
                "groups_per_block": {g["block"]: g["groups"] for g in r.report["groups_per_block"]},
            }
            for r in result.results
        ],
        "merge_order": result.order,
    }
