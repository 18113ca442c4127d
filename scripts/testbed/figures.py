"""The testbed's figures, produced with mergecli's own commands (docs/testbed.md).

``python -m scripts.testbed figures TESTBED [--docs docs]`` runs, on a built testbed:

1. every method of ``METHODS``: hyperparameters chosen on validation data with ``mergecli sweep``
   (or ``mergecli merge`` when there is nothing to choose), the chosen merge scored on the test
   data with ``mergecli evaluate`` (built-in accuracy), next to the base and the experts;
2. FlexMerge with task arithmetic at each deployed size (``mergecli flex --sizes ... --evaluate``);
3. merges at each training duration (``mergecli sweep --over-checkpoints``);
4. ``tuned``: the same with λ chosen on validation at every duration, experts early-stopped
   with patience 3 beside them, reported on the test data (``--grid``, ``--stop-patience``,
   ``evaluate.test_data``).

It writes ``DOCS/figures/testbed-*.png`` and ``testbed-results.json``, and the markdown tables
between the markers of ``DOCS/testbed.md``. ``--parts`` reruns some of the three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

METHODS: dict[str, dict[str, str]] = {
    "linear": {},
    "task_arithmetic": {"lambda": "0.1:1.0:0.1"},
    "ties": {"density": "0.2,0.4", "lambda": "0.6:1.6:0.2"},
    "dare_ties": {"density": "0.5,0.7", "lambda": "0.4:1.6:0.2"},
    "magmax": {"lambda": "0.2:1.0:0.2"},
    "tsv": {"alpha": "0.4:2.0:0.2"},
    "model_stock": {},
    "greedy_soup": {},
}
"""Method -> validation grid (``--grid KEY=VALUES``); empty: merged as is."""

DURATION_METHODS = "linear,task_arithmetic,greedy_soup"
SIZES = "1,1.5,2,3,4,5,6,7,8"
BEGIN, END = "<!-- testbed-results:begin -->", "<!-- testbed-results:end -->"
PATH_KEYS = ("files", "folder", "output", "checkpoints")
PAPER_TA_GAIN = 13.5  # FlexMerge paper: task arithmetic from 1× to 2×, 8 vision tasks (points)


def mergecli(*args: object) -> Any:
    """``python -m mergecli ARGS --json`` offline; its JSON output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "mergecli", *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[2:])} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


class Bench:
    """A built testbed and a work folder for recipes and merges."""

    def __init__(self, testbed: Path, work: Path) -> None:
        self.root = testbed.resolve()
        self.work = work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.info = json.loads((self.root / "testbed.json").read_text())
        self.tasks: list[str] = self.info["tasks"]

    def recipe(
        self, name: str, part: str, models: str = "experts", test: bool = False, **fields: Any
    ) -> Path:
        """A recipe over the experts (or the runs) scored on the ``part`` data of every task
        (and reporting on the test data when ``test``)."""
        spec = {
            "merge_method": "task_arithmetic",
            "base_model": str(self.root / "base"),
            "models": [{"model": str(self.root / models / t), "name": t} for t in self.tasks],
            **fields,
            "evaluate": {
                "metric": "accuracy",
                "data": str(self.root / "data" / "{task}" / f"{part}.jsonl"),
                "batch_size": 512,
                **(
                    {"test_data": str(self.root / "data" / "{task}" / "test.jsonl")} if test else {}
                ),
            },
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path


def portable(data: Any) -> Any:
    """``data`` without the machine's paths (the keys of ``PATH_KEYS``; steps stay)."""
    if isinstance(data, dict):
        return {k: portable(v) for k, v in data.items() if k not in PATH_KEYS}
    if isinstance(data, list):
        return [portable(v) for v in data]
    return data


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def compare_methods(bench: Bench) -> dict[str, Any]:
    """Validation-chosen merges of every method; base, merges and experts scored on test data."""
    chosen: dict[str, dict[str, Any]] = {}
    for method, grid in METHODS.items():
        path = bench.recipe(method, "validation", merge_method=method)
        target = bench.work / "merged" / method
        if grid:
            axes = [f"--grid={k}={v}" for k, v in grid.items()]
            best = mergecli("sweep", path, *axes, "-o", target, "--force")["best"]
            chosen[method] = {"parameters": best["parameters"], "validation": best["score"]}
        else:
            mergecli("merge", path, "-o", target, "--force")
            chosen[method] = {"parameters": {}}
    names = ["base", *METHODS, *(f"expert:{t}" for t in bench.tasks)]
    models = [
        bench.root / "base",
        *(bench.work / "merged" / m for m in METHODS),
        *(bench.root / "experts" / t for t in bench.tasks),
    ]
    test = bench.recipe("test", "test")
    rows = mergecli("evaluate", test, *(f"--model={m}" for m in models))["rows"]
    scores = {name: row["tasks"] for name, row in zip(names, rows, strict=True)}
    scores["experts"] = {t: scores.pop(f"expert:{t}")[t] for t in bench.tasks}
    return {"chosen": chosen, "test": scores}


def flex_curve(bench: Bench, lam: float, out: Path) -> dict[str, Any]:
    """FlexMerge with task arithmetic at every deployed size, each task's model scored on its
    test data (``mergecli flex --sizes ... --evaluate``); λ·mean(τ) with λ = M·λ_TA, so that
    size 1 is the task-arithmetic merge chosen on validation."""
    scale = round(lam * len(bench.tasks), 6)
    path = bench.recipe("flex", "test", parameters={"lambda": scale, "normalize": True})
    target = bench.work / "flex"
    result = mergecli("flex", path, "--sizes", SIZES, "--evaluate", "-o", target, "--force")
    shutil.copyfile(target / "flex_scores.png", out / "testbed-size.png")
    return {"lambda": scale, **portable(result["evaluation"])}


def durations(bench: Bench, lam: float, out: Path) -> dict[str, Any]:
    """Merges of the runs' checkpoints at multiples of each expert's best-validation step."""
    path = bench.recipe("durations", "validation", models="runs", parameters={"lambda": lam})
    target = bench.work / "durations"
    result = mergecli(
        "sweep", path, "--over-checkpoints", "--methods", DURATION_METHODS, "-o", target, "--force"
    )
    shutil.copyfile(target / "durations.png", out / "testbed-duration.png")
    return portable(result)


TUNED_GRID = "lambda=0.1:1.0:0.1"
PATIENCE = 3


def tuned_durations(bench: Bench, out: Path) -> dict[str, Any]:
    """Task arithmetic at multiples of T* with λ chosen on validation at each duration, the
    early-stopped experts beside them, reported on test data."""
    path = bench.recipe("tuned", "validation", models="runs", test=True)
    target = bench.work / "tuned"
    result = mergecli(
        "sweep", path, "--over-checkpoints", "--grid", TUNED_GRID, "--methods",
        "linear,task_arithmetic", "--stop-patience", PATIENCE, "-o", target, "--force",
    )  # fmt: skip
    shutil.copyfile(target / "durations.png", out / "testbed-duration-tuned.png")
    return portable(result)


def tuned_table(result: dict[str, Any]) -> list[str]:
    methods = result["methods"]
    lines = [
        "| × T* | " + " | ".join(f"{m} (test)" for m in methods) + " | λ chosen | experts (test) |",
        "|---|" + "---|" * (len(methods) + 2),
    ]
    stop = result.get("early_stop")
    rows = [(f"{p['x']:g}", p) for p in result["points"]]
    if stop:
        rows.append((f"early stop (P={stop['patience']}, {stop['x']:.2f}× on average)", stop))
    for label, point in rows:
        cells = [_pct(point["methods"][m]["test"]["score"]) for m in methods]
        lam = point["methods"]["task_arithmetic"].get("parameters", {}).get("lambda", "–")
        cells += [str(lam), _pct(point["expert_test_score"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tstar = ", ".join(f"{t} {s}" for t, s in result["tstar"].items())
    lines += ["", f"T* (minimum validation loss, steps): {tstar}."]
    return lines


def methods_figure(scores: dict[str, dict[str, float]], path: Path) -> None:
    names = list(scores)
    values = [100 * mean(scores[n]) for n in names]
    fig = Figure(figsize=(8, 3.6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(names, values, color=["0.6" if n in ("base", "experts") else "tab:blue" for n in names])
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Merging {len(scores['experts'])} digit-transform experts: average test accuracy")
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.savefig(path)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def methods_table(methods: dict[str, Any]) -> list[str]:
    tasks = list(methods["test"]["experts"])
    lines = [
        "| model | chosen on validation | " + " | ".join(tasks) + " | **average** |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, scores in methods["test"].items():
        chosen = methods["chosen"].get(name, {}).get("parameters", {})
        params = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "–"
        cells = " | ".join(_pct(scores[t]) for t in tasks)
        lines.append(f"| {name} | {params} | {cells} | **{_pct(mean(scores))}** |")
    return lines


def flex_table(flex: dict[str, Any]) -> list[str]:
    sizes = flex["sizes"]
    two = next((r["size"] for r in sizes if r["target"] == 2), 2.0)
    return [
        "| deployed size (models) | " + " | ".join(f"{r['size']:.2f}×" for r in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        "| average test accuracy (%) | " + " | ".join(_pct(r["score"]) for r in sizes) + " |",
        "",
        f"Task arithmetic (λ·mean(τ), λ = {flex['lambda']:g}) gains "
        f"**{100 * flex['gain_1x_2x']:+.1f} points** from 1× to 2× ({two:.2f}× reached; experts: "
        f"{_pct(flex['expert_score'])} %); the FlexMerge paper reports {PAPER_TA_GAIN:+.1f} points "
        "on its 8 vision tasks.",
    ]


def durations_table(result: dict[str, Any]) -> list[str]:
    methods = result["methods"]
    head = "× T*" if result["by"] == "tstar" else "step"
    lines = [
        f"| {head} | " + " | ".join(methods) + " | experts |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for point in result["points"]:
        cells = [_pct(point["methods"][m]["score"]) for m in methods]
        expert = point["expert_score"]
        cells.append(_pct(expert) if expert is not None else "–")
        lines.append(f"| {point['x']:g} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    sections = (
        ("methods", "Method comparison (test accuracy, %)", methods_table),
        ("flex", "Accuracy against deployed size (FlexMerge)", flex_table),
        ("durations", "Merged validation accuracy (%) against training duration", durations_table),
        (
            "tuned",
            "Test accuracy (%) against training duration, λ chosen on validation per duration",
            tuned_table,
        ),
    )
    for key, title, table in sections:
        if key in results:
            lines += [f"#### {title}", "", *table(results[key]), ""]
    return "\n".join(lines).strip()


def write_doc(doc: Path, table: str) -> None:
    head, rest = doc.read_text().split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


PARTS = ("methods", "flex", "durations", "tuned")


def figures(
    testbed: Path, docs: Path, parts: tuple[str, ...] = PARTS, work: Path | None = None
) -> dict[str, Any]:
    """Run the ``parts`` on ``testbed``; write figures, results and tables under ``docs``.

    Results of parts not rerun are kept from ``DOCS/figures/testbed-results.json``."""
    bench = Bench(testbed, work or testbed / "work")
    out = docs / "figures"
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "testbed-results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    if "methods" in parts or "methods" not in results:
        results["methods"] = compare_methods(bench)
        methods_figure(results["methods"]["test"], out / "testbed-methods.png")
    lam = results["methods"]["chosen"]["task_arithmetic"]["parameters"]["lambda"]
    if "flex" in parts:
        results["flex"] = flex_curve(bench, lam, out)
    if "durations" in parts:
        results["durations"] = durations(bench, lam, out)
    if "tuned" in parts:
        results["tuned"] = tuned_durations(bench, out)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(docs / "testbed.md", markdown(results))
    return results
