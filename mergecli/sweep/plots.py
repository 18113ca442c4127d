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
    """Loss along the interpolation path, per task and mean, with the mean of its ends (dotted)
    and the chord between its ends (dashed) that the two barriers are measured from."""
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    alphas = result["alphas"]
    for task, values in result["tasks"].items():
        ax.plot(alphas, values, alpha=0.45, linewidth=1, label=task)
    mean = result["mean"]
    ax.plot(alphas, mean, color="black", marker="o", linewidth=2, label="mean")
    ax.axhline((mean[0] + mean[-1]) / 2, color="grey", linestyle=":", linewidth=1)
    ax.plot(
        [alphas[0], alphas[-1]], [mean[0], mean[-1]], color="grey", linestyle="--", label="chord"
    )
    ax.set_xlabel("α")
    ax.set_ylabel(result["metric"])
    ax.set_title(
        f"{result['path_formula']}\nbarrier = {result['barrier']:.4g} (ends), "
        f"{result['chord_barrier']:.4g} (chord)"
    )
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


def barriers_figure(result: dict[str, Any], path: Path) -> Path:
    """Mean barrier over expert pairs against training duration, both kinds, the range over
    pairs shaded (Figure 3 of the training-duration paper); at one point, a bar per pair."""
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    labels = {"barrier": "max − mean of ends", "chord_barrier": "max above the chord"}
    if "points" not in result:
        pairs = result["pairs"]
        ticks = list(range(len(pairs)))
        for shift, kind in ((-0.2, "barrier"), (0.2, "chord_barrier")):
            ax.bar([t + shift for t in ticks], [p[kind] for p in pairs], 0.4, label=labels[kind])
        ax.set_xticks(ticks, ["–".join(p["models"]) for p in pairs], rotation=45, ha="right")
        ax.set_xlabel("expert pair")
        title = "Barrier of each expert pair's linear path"
    else:
        points = result["points"]
        x = [p["x"] for p in points]
        for kind in ("barrier", "chord_barrier"):
            (line,) = ax.plot(x, [p[kind] for p in points], marker="o", label=labels[kind])
            ax.fill_between(
                x,
                [min(q[kind] for q in p["pairs"]) for p in points],
                [max(q[kind] for q in p["pairs"]) for p in points],
                color=line.get_color(),
                alpha=0.15,
            )
        by_tstar = result["by"] == "tstar"
        if by_tstar:
            ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("training steps as a multiple of T*" if by_tstar else "training step")
        title = (
            "Mean barrier over expert pairs against training duration\n(range over pairs shaded)"
        )
    ax.set_ylabel(f"barrier of {result['metric']} on (1−α)θA + αθB")
    ax.set_title(title)
    return _save(fig, ax, path)


def gains_figure(result: dict[str, Any], path: Path) -> Path:
    """Merge gain (and SWA gain) against the effective noise scale S̃, one point per setting
    (Figure 1c of the optimiser-bias paper)."""
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rows = result["settings"]
    x = [r["noise_scale"] for r in rows]
    ax.plot(x, [r["merge_gain"] for r in rows], marker="o", label="merge gain")
    if all("swa" in r for r in rows):
        ax.plot(x, [r["swa"]["gain"] for r in rows], marker="s", label="SWA gain")
    for r in rows:
        ax.annotate(
            r["setting"],
            (r["noise_scale"], r["merge_gain"]),
            fontsize=7,
            alpha=0.7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    if len(set(x)) > 1 and min(x) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(f"effective noise scale {result['formula']}")
    ax.set_ylabel(f"f(merge) − mean f(experts), {result['metric']}")
    ax.set_title("Merging gain against the experts' effective noise scale")
    return _save(fig, ax, path)
