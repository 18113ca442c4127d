"""Write an MoE plan's output folder on the runner: atomically, under the target's lock, with
report and model card.

The layouts: ``moe/arrow_output.py`` (LoRA experts) and ``moe/sparse_output.py`` (full
fine-tunes). Both add ``moe_report.json``, ``moe_report.md`` and ``README.md``.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.engine.folder_run import folder_run
from mergecli.moe.arrow_output import write_arrow
from mergecli.moe.plan import MoePlan
from mergecli.moe.report import markdown_report, model_card
from mergecli.moe.sparse_output import write_sparse
from mergecli.progress import Progress


@dataclass
class MoeResult:
    folder: Path
    report: dict[str, Any]


def run_moe(
    plan: MoePlan,
    output: str | Path,
    force: bool = False,
    progress: Progress | None = None,
    wait: bool = False,
) -> MoeResult:
    """Write the planned MoE into ``output`` (replaced only with ``force``; ``wait`` for a run
    that holds the target's lock instead of failing)."""
    with folder_run(output, force, wait, plan.bytes_on_disk, progress) as run:
        folder, timer = run.folder, run.runner.timer
        write = write_arrow if plan.kind == "arrow" else write_sparse
        report = write(plan, folder, run.runner)
        report |= {
            "output": str(run.output),
            "kind": plan.kind,
            "plan": plan.summary(),
            "recipe": plan.recipe.model_dump(mode="json", exclude={"folder"}, exclude_none=True),
            "wall_s": run.wall,
            "timing": {
                "read_s": timer.read,
                "compute_s": timer.compute,
                "write_s": timer.write,
            },
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        (folder / "moe_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "moe_report.md").write_text(markdown_report(report))
        (folder / "README.md").write_text(model_card(plan, report))
    return MoeResult(run.output, report)
