"""PNG figures of evaluation-driven runs, drawn on matplotlib's Agg canvas (no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 120


def _score_label(result: dict[str, Any]) -> str:
    arrow = "higher is better" if result["higher_is_better"] else "lower is better"
    return f"mean {result['metric']} over tasks ({arrow})"


def _save(fig: Figure, ax: Axes, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def durations_figure(result: dict[str, Any], path: Path) -> Path:
    """Merged score per method and the experts' score against training duration (Figure 1)."""
    fig = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    points = result["points"]
    x = [p["x"] for p in points]
    by_tstar = result["by"] == "tstar"
    if by_tstar:
        low, high = min([*x, 1.0]), max([*x, 1.0])
        pad = 0.05 * (high - low or 1.0)
        ax.set_xlim(low - pad, high + pad)
        ax.axvspan(low - pad, 1.0, color="tab:green", alpha=0.08, label="undertrained (< T*)")
        ax.axvspan(1.0, high + pad, color="tab:red", alpha=0.08, label="overfitted (> T*)")
    tested = result.get("protocol", {}).get("reported_on") == "test"
    std = result.get("std")
    for method in result["methods"]:
        entries = [p["methods"][method] for p in points]
        y = [e["test"]["score"] if tested else e["score"] for e in entries]
        (line,) = ax.plot(x, y, marker="o", label=method)
        if std is not None:
            spread = [p["methods"][method] for p in std["points"]]
            dy = [e["test"]["score"] if tested else e["score"] for e in spread]
            low = [a - b for a, b in zip(y, dy, strict=True)]
            high = [a + b for a, b in zip(y, dy, strict=True)]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    stop = result.get("early_stop")
    if stop is not None and stop["x"] is not None:
        for method in result["methods"]:
            entry = stop["methods"][method]
            ax.scatter(
                [stop["x"]],
                [entry["test"]["score"] if tested else entry["score"]],
                marker="*",
                s=120,
                zorder=3,
                label=f"{method}, early stop (P={stop['patience']})",
            )
    expert_key = "expert_test_score" if tested else "expert_score"
    if any(p[expert_key] is not None for p in points):
        ax.plot(
            x,
            [p[expert_key] for p in points],
            linestyle="--",
            color="black",
            marker="s",
            label="experts (own task)",
        )
    ax.set_xlabel("training steps as a multiple of T*" if by_tstar else "training step")
    ax.set_ylabel(_score_label(result) + (" on test data" if tested else ""))
    seeds = f"; mean ± std over {len(result['seeds'])} seeds" if std is not None else ""
    ax.set_title(
        "Merged model against expert training duration\n"
        + ("chosen on validation, reported on test" if tested else "validation data")
        + seeds
    )
    return _save(fig, ax, path)


def landscape_figure(result: dict[str, Any], path: Path) -> Path:
    """Loss along the interpolation path, per task and mean, with the barrier marked."""
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    alphas = result["alphas"]
    for task, values in result["tasks"].items():
        ax.plot(alphas, values, alpha=0.45, linewidth=1, label=task)
    ax.plot(alphas, result["mean"], color="black", marker="o", linewidth=2, label="mean")
    ends = (result["mean"][0] + result["mean"][-1]) / 2
    ax.axhline(ends, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("α")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{result['path_formula']}   barrier = {result['barrier']:.4g}")
    return _save(fig, ax, path)


def sizes_figure(result: dict[str, Any], path: Path) -> Path:
    """Mean score against deployed size in models, the experts' mean as a dashed line."""
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rows = sorted(result["sizes"], key=lambda r: r["size"])
    tested = "experts_test" in result
    ax.plot(
        [r["size"] for r in rows],
        [r["test"]["score"] if tested else r["score"] for r in rows],
        marker="o",
        label=f"FlexMerge + {result['method']}",
    )
    expert = result["expert_test_score"] if tested else result["expert_score"]
    if expert is not None:
        ax.axhline(expert, color="black", linestyle="--", label="experts (own task)")
    ax.set_xlabel("deployed size (× one model)")
    ax.set_ylabel(_score_label(result) + (" on test data" if tested else ""))
    ax.set_title("Score against deployed size")
    return _save(fig, ax, path)
