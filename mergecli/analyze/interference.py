"""`analyze interference`: how much a recipe's experts interfere, streamed like a merge.

The recipe's base and experts are checked and read as for a merge (``plan_inputs``, the
runner; its merge method and parameters play no part). Passes: the exact model-scope top-k
thresholds (``KthLargestMagnitude``, two passes in float32), then one pass that adds every
tensor's sums to the whole model, its layer and its block. Memory stays that of a merge: a few
tensors at a time plus M×M sums per layer and block.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from mergecli.analyze.counts import Counts, tensor_counts
from mergecli.analyze.metrics import figures
from mergecli.analyze.runs import run_checkpoints
from mergecli.blocks import block_of
from mergecli.engine.plan import InputPlan, TensorPlan, plan_inputs
from mergecli.engine.runner import Each, Runner
from mergecli.errors import RecipeError
from mergecli.layers import layer_index, layer_prefix
from mergecli.methods import TensorInputs
from mergecli.methods.statistics import Handle, KthLargestMagnitude
from mergecli.progress import NullProgress, Progress
from mergecli.recipe import Recipe
from mergecli.sources.resolve import is_adapter, locate

THRESHOLDS: Handle[list[float]] = Handle("analyze.thresholds")
TOP_K = 0.2
TALL_LAMBDA = 0.6


def analysis_plan(recipe: Recipe, device: str = "cpu") -> InputPlan:
    """The recipe's base (or the one its adapters name) and experts, checked as for a merge,
    whatever its merge method."""
    folders = [
        locate(recipe, m.model, f"models[{i}].model", m.revision)
        for i, m in enumerate(recipe.models)
    ]
    if not recipe.base_model and not any(is_adapter(f) for f in folders):
        raise RecipeError(
            "base_model: analyze interference measures task vectors from a base", key="base_model"
        )
    if len(recipe.models) < 2:
        raise RecipeError(
            "models: analyze interference needs at least two experts, got 1", key="models"
        )
    for i, path in enumerate(folders):
        steps = run_checkpoints(path)
        if steps and not any(path.glob("*.safetensors")):
            raise RecipeError(
                f"models[{i}].model: '{path}' is a training run (checkpoint-{min(steps)} … "
                f"checkpoint-{max(steps)}); use --over-checkpoints or name one checkpoint",
                key=f"models[{i}].model",
            )
    if recipe.temporal is not None:
        raise RecipeError(
            "temporal: this recipe folds experts over time; run 'mergecli temporal'", key="temporal"
        )
    return plan_inputs(recipe, device)


def analyze_interference(
    recipe: Recipe,
    top_k: float = TOP_K,
    tall_lambda: float = TALL_LAMBDA,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Interference figures of the whole model, per layer and per block (``metrics.figures``).

    ``top_k`` is the fraction of each task vector kept by magnitude, model scope (k = ceil(top_k ·
    n) over all merged tensors, entries tied with the k-th magnitude kept); ``tall_lambda`` is
    the TALL mask threshold λ. ``progress`` sees one phase per pass; the caller stops it.
    """
    if not 0 < top_k <= 1:
        raise RecipeError(f"--top-k: {top_k} is not in (0, 1]", key="--top-k")
    if tall_lambda < 0:
        raise RecipeError(f"--tall-lambda: {tall_lambda} is negative", key="--tall-lambda")
    progress = progress or NullProgress()
    started = time.perf_counter()
    plan = analysis_plan(recipe, device)
    experts = len(plan.experts)
    merged = plan.reading([t for t in plan.tensors if t.merge])
    statistic = KthLargestMagnitude(THRESHOLDS, [top_k] * experts)
    runner = Runner(progress)
    thresholds = runner.statistics(merged, [statistic])[THRESHOLDS]
    model = Counts(experts)
    layers: dict[str, Counts] = {}
    blocks: dict[str, Counts] = {}

    def add(tensor: TensorPlan, inputs: TensorInputs) -> None:
        counts = tensor_counts(inputs.task_vectors(), thresholds, tall_lambda)
        model.add(counts)
        prefix = layer_prefix(tensor.name)
        if prefix is not None:
            layers.setdefault(prefix, Counts(experts)).add(counts)
        blocks.setdefault(block_of(tensor.name), Counts(experts)).add(counts)

    runner.run(merged, [Each(add)], "interference")
    assert plan.base is not None
    return {
        "experts": plan.expert_names,
        "base": str(plan.base.path),
        "paths": [str(e.path) for e in plan.experts],
        "top_k": top_k,
        "tall_lambda": tall_lambda,
        "thresholds": thresholds,
        "model": figures(model),
        "layers": [
            {"layer": name, "index": layer_index(name + "."), **figures(c)}
            for name, c in layers.items()
        ],
        "blocks": [{"block": name, **figures(c)} for name, c in blocks.items()],
        "warnings": plan.warnings,
        "passes": 1 + statistic.passes(plan.compute_dtype),
        "bytes_read": runner.timer.bytes_read,
        "wall_s": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": str(plan.device),
    }
