"""Run a batch: recipes in dependency order, each skipped when its output is already complete
for the same recipe and inputs, a failure stopping only the recipes that need it.

A finished output holds ``mergecli_batch.json`` with the recipe's fingerprint: a SHA-256 over
the recipe (all keys but ``output``), the fingerprints of its inputs (a dependency's own batch
fingerprint), the device, the shard size and the mergecli version. The output is merged into a
staging folder beside the target, the fingerprint written into it, and the folder renamed into
place, so a folder holding a fingerprint is always complete; a run killed at any moment is
resumed by running the batch again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import mergecli
from mergecli.batch.display import BatchDisplay
from mergecli.batch.graph import Batch, BatchRecipe
from mergecli.distributed.executor import LocalExecutor, RayExecutor, here
from mergecli.engine.merge import run_merge
from mergecli.engine.output import output_lock
from mergecli.engine.plan import MergePlan, plan_merge
from mergecli.errors import BatchError, MergeError, OutputError
from mergecli.methods import get_method
from mergecli.progress import NullProgress, Progress

MARKER = "mergecli_batch.json"
Status = Literal["ran", "skipped", "failed", "blocked"]


@dataclass(frozen=True)
class RunOptions:
    """How every recipe of the batch is merged."""

    device: str = "cpu"
    shard_size: str = "5GB"
    force: bool = False
    """Replace outputs that exist but were not written by a batch."""
    wait: bool = False
    """Wait for another run writing the same output (then skip it if that run completed it),
    instead of failing the recipe."""


@dataclass
class Outcome:
    """What happened to one recipe."""

    name: str
    status: Status
    output: str
    seconds: float = 0.0
    fingerprint: str | None = None
    error: str | None = None
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("ran", "skipped")


@dataclass
class BatchResult:
    """The outcome of every recipe, in run order."""

    outcomes: list[Outcome]

    @property
    def failed(self) -> bool:
        return any(not o.ok for o in self.outcomes)

    def check(self) -> None:
        """Raise a BatchError naming the recipes that failed or were blocked, if any."""
        failed = [o.name for o in self.outcomes if o.status == "failed"]
        blocked = [o.name for o in self.outcomes if o.status == "blocked"]
        if failed or blocked:
            message = f"{len(failed)} of {len(self.outcomes)} recipes failed ({', '.join(failed)})"
            if blocked:
                message += f"; {len(blocked)} did not run ({', '.join(blocked)})"
            raise BatchError(message, failed, blocked)

    def summary(self) -> dict[str, Any]:
        counts = {s: sum(o.status == s for o in self.outcomes) for s in get_args(Status)}
        return {"counts": counts, "recipes": [asdict(o) for o in self.outcomes]}


def fingerprint(
    entry: BatchRecipe, plan: MergePlan, needs: dict[str, str], options: RunOptions
) -> str:
    """The recipe's fingerprint (see the module's docstring)."""
    sources = ([plan.base] if plan.base else []) + list(plan.experts)
    data = {
        "recipe": entry.recipe.model_dump(mode="json", exclude={"folder", "output"}),
        "inputs": [src.fingerprint() for src in sources],
        "needs": needs,
        "device": options.device,
        "shard_size": options.shard_size,
        "mergecli": mergecli.__version__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def completed(output: Path) -> str | None:
    """The fingerprint a batch left in a finished output, or None."""
    try:
        return json.loads((output / MARKER).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_recipe(
    entry: BatchRecipe,
    needs: dict[str, str],
    options: RunOptions,
    progress: Progress | None = None,
) -> Outcome:
    """Merge one recipe unless its output is complete; a MergeError becomes a failed outcome."""
    started = time.perf_counter()
    outcome = Outcome(entry.name, "ran", str(entry.output))
    try:
        # headers only: a selecting method's experts are selected when it is merged
        plan = plan_merge(entry.recipe, options.device, options.shard_size, experts_selected=True)
        outcome.fingerprint = fingerprint(entry, plan, needs, options)
        # checked and replaced under the output's lock: a concurrent batch (or merge) writing
        # the same output makes this recipe fail at once, or wait and then find it complete
        with output_lock(entry.output, options.wait):
            done = completed(entry.output)
            if done == outcome.fingerprint:
                outcome.status = "skipped"
            else:
                if entry.output.exists() and done is None and not options.force:
                    raise OutputError(
                        f"recipe '{entry.name}': output '{entry.output}' exists and was not "
                        "written by a batch; use --force to replace it",
                        entry.output,
                    )
                _merge(entry, plan, outcome.fingerprint, options, progress or NullProgress())
    except MergeError as exc:
        outcome.status, outcome.error = "failed", str(exc)
    except Exception as exc:
        outcome.status, outcome.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    return outcome


def _merge(
    entry: BatchRecipe, plan: MergePlan, digest: str, options: RunOptions, progress: Progress
) -> None:
    """Merge into a staging folder, mark it complete, rename it over the output."""
    if get_method(entry.recipe.merge_method).selects_experts:
        from mergecli.evaluate import plan_with_selection

        plan, _ = plan_with_selection(entry.recipe, options.device, options.shard_size)
    output = entry.output
    stage = output.parent / f".{output.name}.mergecli-batch"
    shutil.rmtree(stage, ignore_errors=True)
    run_merge(plan, stage, force=True, progress=progress)
    (stage / MARKER).write_text(
        json.dumps({"mergecli_batch": 1, "name": entry.name, "fingerprint": digest}) + "\n"
    )
    old = output.parent / f".{output.name}.mergecli-old"
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        output.rename(old)
    stage.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _after(entry: BatchRecipe, options: RunOptions, *needed: Outcome) -> Outcome:
    """``run_recipe`` once the recipes it needs are done; blocked when one of them is not."""
    missing = [o.name for o in needed if not o.ok]
    if missing:
        return Outcome(
            entry.name, "blocked", str(entry.output), error=f"needs {', '.join(missing)} (failed)"
        )
    return run_recipe(entry, {o.name: o.fingerprint or "" for o in needed}, options)


def run_batch(
    batch: Batch,
    options: RunOptions | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
    display: BatchDisplay | None = None,
) -> BatchResult:
    """Run every recipe of ``batch``: here, one after the other, or on Ray, each recipe a task
    of its own that starts once the recipes it needs are done. ``display`` shows the whole
    batch (and here, the running recipe's merge)."""
    options = options or RunOptions()
    display = display or BatchDisplay()
    display.begin(len(batch.recipes))
    outcomes: dict[str, Outcome] = {}
    if executor is None or executor.kind == "local":
        for entry in batch.recipes:
            needed = [outcomes[n] for n in entry.needs]
            if all(o.ok for o in needed):
                fps = {o.name: o.fingerprint or "" for o in needed}
                outcome = run_recipe(entry, fps, options, display.recipe(entry.name))
                outcome.where = here()
            else:
                outcome = _after(entry, options, *needed)
            outcomes[entry.name] = outcome
            display.finished(outcome)
    else:
        handles: dict[str, Any] = {}
        for entry in batch.recipes:
            needed = [handles[n] for n in entry.needs]
            handles[entry.name] = executor.submit(_after, entry, options, *needed)
        for done, entry in zip(executor.results(), batch.recipes, strict=True):
            if done.error is None:
                outcome = done.value
            elif any(not outcomes[n].ok for n in entry.needs):
                outcome = _after(entry, options, *(outcomes[n] for n in entry.needs))
            else:
                error = f"{type(done.error).__name__}: {done.error}"
                outcome = Outcome(entry.name, "failed", str(entry.output), error=error)
            outcome.where = done.where
            outcomes[entry.name] = outcome
            display.finished(outcome)
    display.end()
    return BatchResult(list(outcomes.values()))


def preview(batch: Batch, options: RunOptions | None = None) -> list[dict[str, Any]]:
    """The graph in run order with what a run would do to each recipe (headers only):
    ``skip`` (complete for this recipe and inputs), ``run``, or ``error`` with the reason."""
    options = options or RunOptions()
    prints: dict[str, str | None] = {}
    rows = []
    for entry, row in zip(batch.recipes, batch.graph(), strict=True):
        prints[entry.name] = None
        if any(prints[n] is None for n in entry.needs):
            row["action"] = "run"
        else:
            try:
                plan = plan_merge(  # headers only: a selecting method's plan lists every expert
                    entry.recipe, options.device, options.shard_size, experts_selected=True
                )
                needs = {n: prints[n] or "" for n in entry.needs}
                mine = fingerprint(entry, plan, needs, options)
            except MergeError as exc:
                row.update(action="error", error=str(exc))
            else:
                done = completed(entry.output) == mine
                row["action"] = "skip" if done else "run"
                prints[entry.name] = mine if done else None
        rows.append(row)
    return rows
