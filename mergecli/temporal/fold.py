"""Create a state and fold experts into it: the EMA and deploy-all merges, then one commit.

Each merge is an ordinary recipe planned with ``plan_merge`` and streamed by ``run_merge``, so
any registered method works and memory is that of one merge, whatever the number of steps.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergecli.engine.checks import model_warnings
from mergecli.engine.merge import run_merge
from mergecli.engine.plan import MergePlan, plan_merge
from mergecli.errors import RecipeError, SourceError
from mergecli.methods import get_method
from mergecli.progress import Progress
from mergecli.recipe import TemporalSection, recipe_from_dict
from mergecli.sources import Checkpoint
from mergecli.temporal.manifest import Manifest, StepRecord, read_manifest, write_manifest
from mergecli.temporal.recency import recency_weights
from mergecli.temporal.state import (
    STEPS,
    check_source,
    collect_garbage,
    create_state,
    deploy_model,
    init_model,
    locked,
    resolve,
    settle,
)

NewProgress = Callable[[], Progress]
"""Makes a progress reporter for each merge of a step."""


@dataclass
class StepResult:
    """What one ``add`` did: the step, its merges and the models to deploy and to train from."""

    step: int
    name: str
    expert: Path
    added: bool
    init_model: Path
    deploy_model: Path
    merges: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "expert": str(self.expert),
            "added": self.added,
            "init_model": str(self.init_model),
            "deploy_model": str(self.deploy_model),
            "merges": self.merges,
            "warnings": self.warnings,
        }


def step_seed(seed: int, step: int) -> int:
    """Seed of step t's EMA merge: fresh random masks every step, fixed by the recipe's seed."""
    digest = hashlib.sha256(f"{seed}\x00temporal-ema\x00{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def ema_models(prev: str, expert: str, name: str, weight: float) -> list[dict[str, Any]]:
    """The two models of EMA_t = f(θ0, [EMA_{t−1}, θt]) with per-model weights [1 − w, w]."""
    return [
        {"model": prev, "name": "ema", "parameters": {"weight": 1.0 - weight}},
        {"model": expert, "name": name, "parameters": {"weight": weight}},
    ]


def check_settings(
    settings: dict[str, Any], folder: Path | None = None, source: str = "temporal"
) -> tuple[Manifest, list[str]]:
    """Validate temporal settings (recipe keys without models) into a step-0 manifest.

    Everything a step will need is checked now, from headers only: the method, its parameters
    (by planning the first step's merge with the base in every role) and the base itself.
    """
    if not settings.get("base_model"):
        raise RecipeError(
            f"{source}: base_model: temporal merging needs the base (EMA_0 = θ0)", key="base_model"
        )
    data = {**settings, "models": [{"model": settings["base_model"]}]}
    if data.get("temporal") is None:
        data["temporal"] = {}
    recipe = recipe_from_dict(data, folder, source)
    assert recipe.temporal is not None and recipe.base_model is not None
    temporal: TemporalSection = recipe.temporal
    if "weight" in recipe.parameters:
        raise RecipeError(
            f"{source}: parameters.weight: set by temporal merging (the EMA weighs 1 − w and w, "
            "deploy: all weighs experts equally)",
            key="parameters.weight",
        )
    method = get_method(recipe.merge_method).resolve(recipe.parameters)
    if method.output != "model":
        raise RecipeError(
            f"{source}: '{method.name}' writes a task-mask artifact, not a model, so it cannot "
            "be folded over time",
            key="merge_method",
        )
    uses_ema = "ema" in (temporal.init, temporal.deploy)
    weight = method.param("weight")
    if uses_ema and (weight is None or not weight.per_model):
        raise RecipeError(
            f"{source}: '{method.name}' has no per-model weight, so it cannot form the EMA "
            "f(EMA, θt) with weights 1 − w and w; choose init and deploy other than ema",
            key="merge_method",
        )
    if temporal.deploy == "all" and method.max_models is not None:
        raise RecipeError(
            f"{source}: deploy: all merges every expert so far, but '{method.name}' takes at most "
            f"{method.max_models} models",
            key="temporal.deploy",
        )
    if temporal.recency != "uniform" and (weight is None or not weight.per_model):
        raise RecipeError(
            f"{source}: temporal.recency: '{method.name}' has no per-model weight to give the "
            "experts recency weights",
            key="temporal.recency",
        )
    if temporal.deploy == "all" and method.min_models > 1:
        raise RecipeError(
            f"{source}: deploy: all merges the single expert of step 1, but '{method.name}' "
            f"needs at least {method.min_models} models",
            key="temporal.deploy",
        )
    base = recipe.resolve_path(recipe.base_model)
    if not base.is_dir():
        raise SourceError(f"{source}: base_model: '{recipe.base_model}' does not exist", path=base)
    base = base.resolve()
    normalized = recipe.model_dump(mode="json", exclude={"models", "output", "folder"})
    normalized["base_model"] = str(base)
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        normalized["tokenizer_source"] = str(recipe.resolve_path(recipe.tokenizer_source))
    fingerprint = Checkpoint(base, "base_model", allow_bin=recipe.allow_bin).fingerprint()
    manifest = Manifest(settings=normalized, base_fingerprint=fingerprint)
    if uses_ema:
        plan_merge(manifest.recipe(ema_models(str(base), str(base), "base", temporal.ema_weight)))
    elif temporal.deploy == "all":
        plan_merge(manifest.recipe([{"model": str(base)}]))
    warnings = []
    if temporal.deploy != "all" and (temporal.recency != "uniform" or temporal.recency_reversed):
        warnings.append("temporal.recency weighs deploy: all only; it has no effect here")
    if temporal.task_vectors == "previous" and not uses_ema:
        warnings.append("temporal.task_vectors: previous changes the EMA merge only; no EMA here")
    if temporal.init == "base" and temporal.deploy == "latest":
        warnings.append(
            "init: base with deploy: latest serves each expert alone, trained from the base "
            "(the TIME paper leaves this pair out)"
        )
    return manifest, warnings


def init_state(
    state: str | Path,
    settings: dict[str, Any],
    force: bool = False,
    folder: Path | None = None,
    source: str = "temporal init",
) -> tuple[Manifest, list[str]]:
    """Create a state folder at step 0 (init and deploy are the base); returns its warnings.

    ``settings`` are recipe keys without ``models`` (``merge_method``, ``base_model``,
    ``parameters``, ``dtype``, ``out_dtype``, ``seed``, ``temporal``, ...); relative paths are
    resolved against ``folder`` (default: the current folder).
    """
    manifest, warnings = check_settings(settings, folder, source)
    create_state(Path(state).resolve(), manifest, force)
    return manifest, warnings


def model_card(manifest: Manifest, label: str) -> str:
    """README.md of a state model: what it is (EMA_t or the merge of all), from which experts."""
    temporal, settings = manifest.temporal, manifest.settings
    step = len(manifest.steps)
    meta = {
        "library_name": "transformers",
        "tags": ["merge", "mergecli", "temporal-merging"],
        "base_model": settings["base_model"],
    }
    params = ", ".join(f"{k}={v}" for k, v in settings["parameters"].items()) or "defaults"
    against = "θ0" if temporal.task_vectors == "base" else f"EMA_{step - 1}"
    recency = (
        f", {'reversed ' if temporal.recency_reversed else ''}{temporal.recency} recency weights"
        if temporal.recency != "uniform"
        else ""
    )
    what = (
        f"EMA_{step} = f({against}, [EMA_{step - 1}, θ{step}], weights [1 − w, w]) with "
        f"w = {temporal.ema_weight}, EMA_0 = θ0"
        if label == "ema"
        else f"f(θ0, [θ1 .. θ{step}]), the merge of every expert so far{recency}"
    )
    experts = "\n".join(
        f"{i}. `{s.name}`: `{s.expert}`" for i, s in enumerate(manifest.steps, start=1)
    )
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# Temporally merged model\n\n"
        f"Step {step} of a mergecli temporal state (init: {temporal.init}, deploy: "
        f"{temporal.deploy}): {what}, where f is `{settings['merge_method']}` ({params}) and "
        f"θ0 is `{settings['base_model']}`.\n\nExperts θt, in order:\n\n{experts}\n\n"
        "`merge_report.json` describes the last merge.\n"
    )


def _run(
    plan: MergePlan, output: Path, manifest: Manifest, label: str, new_progress: NewProgress | None
) -> dict:
    report = run_merge(plan, output, progress=new_progress() if new_progress else None).report
    (output / "README.md").write_text(model_card(manifest, label))
    return {
        "model": label,
        "output": str(output),
        "wall_s": report["run"]["timing"]["wall_s"],
        "peak_rss_bytes": report["run"]["peak_rss_bytes"],
    }


def fold(
    folder: Path,
    manifest: Manifest,
    expert: Path,
    name: str,
    fingerprint: str,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    new_progress: NewProgress | None = None,
) -> StepResult:
    """Fold ``expert`` in as step t + 1 and commit it (the caller holds the state's lock).

    New models go to ``steps/<t+1>/``, which the current manifest does not reference; the new
    manifest then replaces the old one in one ``os.replace``. Until then the previous state is
    untouched, and any failure removes the unfinished step.
    """
    temporal, settings = manifest.temporal, manifest.settings
    check_source(manifest.base, manifest.base_fingerprint, "base_model", settings["allow_bin"])
    collect_garbage(folder, manifest)
    step = len(manifest.steps) + 1
    step_dir = Path(STEPS) / f"{step:04d}"
    new = manifest.model_copy(deep=True)
    new.steps.append(StepRecord(expert=str(expert), name=name, fingerprint=fingerprint))
    merges: list[dict[str, Any]] = []
    try:
        prev = str(resolve(folder, manifest.ema)) if manifest.ema else str(manifest.base)
        recipe = manifest.recipe(
            ema_models(prev, str(expert), name, temporal.ema_weight),
            seed=step_seed(settings["seed"], step),
            base=prev if temporal.task_vectors == "previous" else None,
        )
        plan = plan_merge(recipe, device, shard_size)  # also checks the expert against the base
        on_purpose = model_warnings(recipe)  # the EMA's recipe lists the base at step 1
        warnings = [w for w in plan.warnings if w not in on_purpose]
        if "ema" in (temporal.init, temporal.deploy):
            merges.append(_run(plan, folder / step_dir / "ema", new, "ema", new_progress))
            new.ema = str(step_dir / "ema")
        del plan
        if temporal.deploy == "all":
            for i, s in enumerate(manifest.steps):
                check_source(
                    Path(s.expert), s.fingerprint, f"step {i + 1} expert", settings["allow_bin"]
                )
            weights = recency_weights(temporal.recency, len(new.steps), temporal.recency_reversed)
            models = [
                {"model": s.expert, "name": s.name}
                | ({"parameters": {"weight": weights[i]}} if weights else {})
                for i, s in enumerate(new.steps)
            ]
            plan = plan_merge(manifest.recipe(models), device, shard_size)
            warnings += [w for w in plan.warnings if w not in warnings]
            merges.append(_run(plan, folder / step_dir / "all", new, "all", new_progress))
            new.merged = str(step_dir / "all")
            del plan
        if temporal.keep_steps:
            new.steps[-1].deploy = deploy_model(new)
        write_manifest(folder, new)
    except BaseException:
        shutil.rmtree(folder / step_dir, ignore_errors=True)
        raise
    settle(folder, new)
    return StepResult(
        step,
        name,
        expert,
        True,
        resolve(folder, init_model(new)),
        resolve(folder, deploy_model(new)),
        merges,
        warnings,
    )


def expert_fingerprint(expert: Path, label: str, allow_bin: bool) -> str:
    """The fingerprint recorded for an expert; MergeError naming ``label`` if it is none."""
    if not expert.is_dir():
        raise SourceError(f"{label}: '{expert}' does not exist or is not a folder", path=expert)
    return Checkpoint(expert, label, allow_bin=allow_bin).fingerprint()


def add_expert(
    state: str | Path,
    expert: str | Path,
    name: str | None = None,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    new_progress: NewProgress | None = None,
) -> StepResult:
    """Fold the next expert into a state (``mergecli temporal add``).

    Rerunning after an interruption completes the step: an uncommitted step is redone from the
    previous state; a committed one (the same expert, unchanged, is already the last step) is not
    added again, only its links and cleanup are finished.
    """
    folder = Path(state).resolve()
    read_manifest(folder)
    path = Path(expert).expanduser().resolve()
    with locked(folder):
        manifest = read_manifest(folder)
        fingerprint = expert_fingerprint(path, "expert", manifest.settings["allow_bin"])
        last = manifest.steps[-1] if manifest.steps else None
        if last and last.expert == str(path) and last.fingerprint == fingerprint:
            settle(folder, manifest)
            return StepResult(
                len(manifest.steps),
                last.name,
                path,
                False,
                resolve(folder, init_model(manifest)),
                resolve(folder, deploy_model(manifest)),
            )
        return fold(
            folder, manifest, path, name or path.name, fingerprint, device, shard_size, new_progress
        )
