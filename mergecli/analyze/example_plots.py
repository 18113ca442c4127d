"""PNG figures of the per-example analyses: forgetting and memorisation by difficulty bin
(undertraining Fig. 3 left, Fig. 4, App. H) and the DiWA decomposition per task.

Drawn on matplotlib's Agg canvas directly (no pyplot, no global state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 120
MEMORISATION = {
    "delta_margin": "Δ margin (late − early)",
    "delta_loss": "Δ loss (early − late)",
    "shift": "predictive shift ‖p_late − p_early‖₁",
}


def _values(rows: list[dict[str, Any]], field: str) -> np.ndarray:
    return np.array([math.nan if r[field] is None else r[field] for r in rows], dtype=float)


def write_forgetting_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """``forgetting.png`` (forgotten share and loss share per bin) and ``memorisation.png``
    (the three App. H metrics per bin), each task as a thin line, the mean over tasks as bars."""
    folder.mkdir(parents=True, exist_ok=True)
    bins = np.arange(1, result["bins"] + 1)
    tasks = result["tasks"]
    where = f"{result['data']}, {len(tasks)} tasks, {result['method']}"
    written = []
    for name, fields, titles in (
        (
            "forgetting.png",
            ("forgotten_share", "loss_share"),
            (
                "share of the forgotten examples (expert right, merge wrong)",
                "share of the expert's loss",
            ),
        ),
        ("memorisation.png", tuple(MEMORISATION), tuple(MEMORISATION.values())),
    ):
        fig = Figure(figsize=(4.6 * len(fields), 3.8), dpi=DPI, layout="constrained")
        for ax, field, title in zip(fig.subplots(1, len(fields)), fields, titles, strict=True):
            ax.bar(bins, _values(result["mean"]["per_bin"], field), color="tab:blue", alpha=0.6)
            for task, figures in tasks.items():
                ax.plot(bins, _values(figures["per_bin"], field), lw=0.8, alpha=0.7, label=task)
            ax.set_xticks(bins)
            ax.set_xlabel("EL2N difficulty bin (1 = easiest)")
            ax.set_title(title, fontsize=9)
        fig.axes[0].legend(fontsize=7)
        fig.suptitle(f"Per difficulty bin, bars = mean over tasks ({where})", fontsize=10)
        fig.savefig(folder / name)
        written.append(folder / name)
    return written


def _terms(rows: list[dict[str, Any]], m: int) -> dict[str, list[float]]:
    return {
        "bias²": [r["bias2"] for r in rows],
        "variance / M": [r["variance"] / m for r in rows],
        "(1 − 1/M) · covariance": [(1 - 1 / m) * r["covariance"] for r in rows],
    }


def write_diwa_plot(result: dict[str, Any], folder: Path) -> Path:
    """``diwa.png``: per task (and the mean) bias², var/M and (1 − 1/M)·cov stacked, the
    ensemble's and the merge's error as markers; over checkpoints, the means over tasks against
    training progress (training-duration Fig. 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    if "points" in result:
        return _diwa_curves(result, folder)
    rows = {**result["tasks"], "mean": result["mean"]}
    m = len(result["members"])
    x = np.arange(len(rows))
    parts = _terms(list(rows.values()), m)
    fig = Figure(figsize=(2 + 0.8 * len(rows), 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    positive, negative = np.zeros(len(rows)), np.zeros(len(rows))
    for label, values in parts.items():
        v = np.array(values)
        bottom = np.where(v >= 0, positive, negative)
        ax.bar(x, v, bottom=bottom, label=label, alpha=0.8)
        positive += np.clip(v, 0, None)
        negative += np.clip(v, None, 0)
    ax.scatter(
        x,
        [r["ensemble"] for r in rows.values()],
        color="black",
        marker="_",
        s=300,
        label="ensemble error",
        zorder=3,
    )
    ax.scatter(
        x,
        [r["merged"] for r in rows.values()],
        color="red",
        marker="o",
        label="merged error",
        zorder=3,
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(x, list(rows), rotation=30, ha="right")
    ax.set_ylabel("squared error of the probabilities")
    runs = len(result["seeds"] or [0])
    ax.set_title(
        f"DiWA decomposition: {m} members, {runs} runs, {result['method']}, {result['data']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    path = folder / "diwa.png"
    fig.savefig(path)
    return path


def _diwa_curves(result: dict[str, Any], folder: Path) -> Path:
    points = result["points"]
    by_step = result["match"] == "step"
    x = [p["step"] if by_step else p["fraction"] for p in points]
    m = len(result["members"])
    means = [p["mean"] for p in points]
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for label, values in _terms(means, m).items():
        ax.plot(x, values, marker="o", label=label)
    ax.plot(x, [p["ensemble"] for p in means], "k--", marker="_", label="ensemble error")
    ax.plot(x, [p["merged"] for p in means], color="red", marker="o", label="merged error")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("training step" if by_step else "fraction of each expert's run")
    ax.set_ylabel("squared error of the probabilities (mean over tasks)")
    runs = len(result["seeds"] or [0])
    ax.set_title(
        f"DiWA decomposition over training: {m} members, {runs} runs, {result['method']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    path = folder / "diwa.png"
    fig.savefig(path)
    return path
