"""PNG figures of an interference analysis: pairwise heatmaps, per-layer and per-step curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mergecli.analyze.metrics import PAIRWISE

LABELS = {
    "sign_conflict": "sign conflict (%)",
    "overlap": "parameter overlap (%)",
    "magnitude_ratio": "magnitude ratio",
    "cosine": "cosine similarity",
    "variance": "per-parameter variance",
    "ties_sign_conflict": "TIES sign conflict (%)",
    "tall_selfish": "TALL selfish weights (%)",
    "tall_catastrophic": "TALL catastrophic weights (%)",
    "norm": "task-vector norm ‖τ‖",
}
CURVES = (*PAIRWISE, "variance", "ties_sign_conflict", "tall_selfish", "tall_catastrophic", "norm")
DPI = 120


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def heatmap(figures: dict[str, Any], metric: str, experts: list[str], title: str) -> Figure:
    """One pairwise matrix: expert names on both axes, values in the cells, a colour bar."""
    matrix = np.array([[_number(v) for v in row] for row in figures[metric]["matrix"]])
    size = 2.5 + 0.6 * len(experts)
    fig = Figure(figsize=(size + 1.2, size), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    vmin, vmax = (-1.0, 1.0) if metric == "cosine" else (None, None)
    cmap = colormaps["coolwarm" if metric == "cosine" else "viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=LABELS[metric])
    ticks = range(len(experts))
    ax.set_xticks(ticks, experts, rotation=45, ha="right")
    ax.set_yticks(ticks, experts)
    if metric == "overlap":
        ax.set_xlabel("expert t")
        ax.set_ylabel("expert s   (cell: |Ms ∩ Mt| / |Ms|)")
    for (s, t), value in np.ndenumerate(matrix):
        if math.isnan(value):
            ax.text(t, s, "n/a", ha="center", va="center", fontsize=8)
        else:
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            color = "white" if dark else "black"
            ax.text(t, s, f"{value:.3g}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title)
    return fig


def curves(
    groups: Sequence[dict[str, Any]],
    x: Sequence[float],
    xlabel: str,
    experts: list[str],
    title: str,
) -> Figure:
    """A grid of panels, one per figure: pair means, whole-group figures and per-expert norms."""
    fig = Figure(figsize=(13, 10), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 3).ravel()
    for ax, metric in zip(axes, CURVES, strict=True):
        if metric == "norm":
            for t, name in enumerate(experts):
                ax.plot(x, [g["norm"][t] for g in groups], marker="o", label=name)
            ax.legend(fontsize=8)
        else:
            ax.plot(x, [_number(summary_value(g, metric)) for g in groups], marker="o")
        _label(ax, metric, xlabel, all(float(v).is_integer() for v in x))
    if all(g["variance"] and g["variance"] > 0 for g in groups):
        axes[CURVES.index("variance")].set_yscale("log")
    fig.suptitle(title)
    return fig


def summary_value(group: dict[str, Any], metric: str) -> float | None:
    """A group's one number for a figure: the mean over pairs for pairwise figures."""
    return group[metric]["mean"] if metric in PAIRWISE else group[metric]


def _label(ax: Axes, metric: str, xlabel: str, integer_x: bool) -> None:
    suffix = " (mean over pairs)" if metric in PAIRWISE else ""
    ax.set_title(LABELS[metric] + suffix, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LABELS[metric])
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=integer_x))


def write_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    """Heatmaps of the whole model's pairwise matrices and the per-layer curves."""
    folder.mkdir(parents=True, exist_ok=True)
    experts, written = result["experts"], []
    scope = f"top {result['top_k']:.0%} by magnitude, whole model"
    for metric in PAIRWISE:
        path = folder / f"{metric}.png"
        subtitle = "full task vectors, whole model" if metric == "cosine" else scope
        heatmap(result["model"], metric, experts, f"{LABELS[metric]}\n{subtitle}").savefig(path)
        written.append(path)
    if result["layers"]:
        layers = result["layers"]
        path = folder / "layers.png"
        x = [g["index"] for g in layers]
        curves(layers, x, "layer", experts, f"Interference per layer ({scope})").savefig(path)
        written.append(path)
    return written


def write_sweep_plot(sweep: dict[str, Any], folder: Path) -> Path:
    """The whole-model figures against training progress."""
    folder.mkdir(parents=True, exist_ok=True)
    points = sweep["points"]
    by_step = sweep["match"] == "step"
    x = [p["step"] if by_step else p["fraction"] for p in points]
    xlabel = "training step" if by_step else "fraction of each expert's run"
    path = folder / "checkpoints.png"
    title = f"Interference over training (top {sweep['top_k']:.0%} by magnitude, whole model)"
    models = [p["model"] for p in points]
    curves(models, x, xlabel, sweep["experts"], title).savefig(path)
    return path
