"""Why recency weights do not help the testbed's offline merge (docs/testbed.md, TIME App. D).

``python -m scripts.testbed.recency_figure OUT.png RUN ...``: each RUN is the output folder of
``mergecli temporal evaluate --pairs base/all`` with one ``temporal.recency`` scheme. Left: every
task's test accuracy after the last step, per scheme; right: each known task's accuracy against
the weight its own expert gets in the merge, over all schemes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mergecli.temporal import recency_weights


def _label(run: dict[str, Any]) -> str:
    return ("reversed " if run["recency_reversed"] else "") + run["recency"]


def _weights(run: dict[str, Any], count: int) -> list[float]:
    found = recency_weights(run["recency"], count, run["recency_reversed"])
    return found if found is not None else [1.0 / count] * count


def draw(out: Path, folders: list[Path]) -> None:
    """Write the two-panel figure of the runs in ``folders`` to ``out``."""
    runs = [json.loads((f / "temporal_eval.json").read_text()) for f in folders]
    known = sorted(runs[0]["adaptation_tasks"], key=runs[0]["adaptation_tasks"].get)
    tasks = known + runs[0]["held_out_tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / (len(runs) + 1)
    bars = [("base θ0", runs[0]["base"]["tasks"])] + [
        (_label(r), r["rows"][-1]["tasks"]) for r in runs
    ]
    for j, (label, scores) in enumerate(bars):
        xs = [i + (j - len(runs) / 2) * width for i in range(len(tasks))]
        left.bar(xs, [100 * scores[t] for t in tasks], width, label=label)
    left.set_xticks(
        range(len(tasks)),
        [f"{t}\n({i + 1})" for i, t in enumerate(known)]
        + [f"{t}\n(held out)" for t in runs[0]["held_out_tasks"]],
    )
    left.set_ylabel("test accuracy after the last step (%)")
    left.set_title("offline merge (init base, deploy all), per task")
    left.legend(fontsize=7, ncol=2)
    for task_index, task in enumerate(known):
        xs = [_weights(r, len(known))[task_index] for r in runs]
        ys = [100 * r["rows"][-1]["tasks"][task] for r in runs]
        right.scatter(xs, ys, label=task)
    right.set_xlabel("weight of the task's own expert in the merge")
    right.set_ylabel("the task's test accuracy (%)")
    right.set_title("each task follows its expert's weight, whatever the scheme")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    draw(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
