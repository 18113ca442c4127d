"""The trajectory plot of ``temporal evaluate`` in TIME's style (App. C): A_KA, A_ZS and
√(A_KA·A_ZS) against the number of tasks seen, one line per (init, deploy) pair, the base
model as a grey star at step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PANELS = (
    ("ka", "A_KA (adaptation tasks)"),
    ("zs", "A_ZS (held-out tasks)"),
    ("geo", "√(A_KA·A_ZS)"),
)


def trajectory_figure(result: dict[str, Any], path: Path) -> Path:
    """Three panels, one line per pair; a panel whose metric is undefined says so."""
    fig = Figure(figsize=(13, 4.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, 3)
    base = result["base"]
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("tasks seen (step t)")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if base[key] is None:
            ax.text(0.5, 0.5, "undefined: no held-out tasks", ha="center", transform=ax.transAxes)
            continue
        for pair in result["pairs"]:
            init, deploy = pair.split("/")
            rows = [r for r in result["rows"] if (r["init"], r["deploy"]) == (init, deploy)]
            ax.plot(
                [0, *(r["step"] for r in rows)],
                [base[key], *(r[key] for r in rows)],
                marker="o",
                markersize=3,
                linestyle="--" if init == "base" else "-",
                label=f"init {init}, deploy {deploy}",
            )
        ax.scatter([0], [base[key]], marker="*", s=160, color="grey", zorder=3, label="base θ0")
    axes[0].set_ylabel(f"mean {result['metric']} on {result['reported_on']} data")
    axes[-1].legend(fontsize=7)
    fig.suptitle(
        f"Temporal merging over time: {result['method']}, EMA weight {result['ema_weight']}"
        + (f", {result['recency']} recency" if result["recency"] != "uniform" else "")
        + ("" if result["trained"] else " (experts trained from θ0)")
    )
    fig.savefig(path)
    return path
