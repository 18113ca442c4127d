"""The one runner: work units over parts of a read plan, and methods that leave their inputs be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergecli
from mergecli.engine.merge import MergePass, merge_state, statistics
from mergecli.engine.outputs import InMemory
from mergecli.engine.runner import Runner
from mergecli.engine.store import Store
from mergecli.methods import TensorInputs, get_method
from mergecli.methods.emr import RESCALERS
from mergecli.methods.result import as_merged
from mergecli.methods.statistics import StatValues
from mergecli.recipe import recipe_from_dict
from tests.conftest import EXPERTS


def test_work_units_over_parts_of_the_read_plan_make_the_whole_merge(zoo: Path) -> None:
    """Two runs over halves of the read plan (as two workers would) store exactly the tensors
    of one in-memory merge, statistics (model-scope TIES) gathered over the whole model."""
    spec = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in EXPERTS],
        "parameters": {"density": 0.3},
    }
    plan = mergecli.plan_merge(recipe_from_dict(spec))
    assert plan.statistics, "model scope gathers thresholds"
    whole = merge_state(plan)
    half = len(plan.tensors) // 2
    parts: dict[str, torch.Tensor] = {}
    for tensors in (plan.tensors[:half], plan.tensors[half:]):
        runner = Runner()
        stats = statistics(plan, runner)
        memory = InMemory()
        passes = [MergePass(plan, stats, runner.timer), Store(memory, runner.timer)]
        runner.run(plan.read_plan(tensors, output=memory), passes)
        parts.update(memory.state)
    assert list(parts) == list(whole)
    for name, tensor in whole.items():
        assert torch.equal(parts[name], tensor), name


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"weight": [1.0, 0.5], "lambda": 1.0, "normalize": False}),
        ("magmax", {"lambda": 1.0}),
        ("emr", {}),
        (
            "ties",
            {
                "weight": [1.0, 1.0],
                "density": [0.5, 0.5],
                "lambda": 1.0,
                "scope": "tensor",
                "merge_func": "mean",
                "sign": "mass",
                "normalize": True,
                "rescale": False,
            },
        ),
    ],
)
def test_methods_leave_their_inputs_unchanged(method: str, params: dict) -> None:
    """A method reads its inputs and returns what it computed (with the fractions it kept):
    the base, the weights and the task vectors handed out before are unchanged."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    weights = [base + torch.randn(6, 5, generator=gen) for _ in range(2)]
    inputs = TensorInputs("w", base.clone(), [w.clone() for w in weights], [None, None])
    inputs.stats = StatValues({RESCALERS: [1.0, 1.0]})
    held = inputs.weights()
    merged = as_merged(get_method(method).fn(inputs, {**params, "conventions": "mergecli"}), 2)
    assert torch.equal(inputs.base, base)
    for got, want in zip(held, weights, strict=True):
        assert torch.equal(got, want)
    for tv, w in zip(inputs.task_vectors(), weights, strict=True):
        assert torch.equal(tv, w - base)
    assert len(merged.kept) == 2
    assert (method == "task_arithmetic") == (merged.kept == [None, None])


def test_read_whole_reads_every_tensor_as_stored_and_stops_at_nan(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mergecli.engine.whole import read_whole
    from mergecli.sources import Checkpoint

    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "ids": torch.tensor([3, 1, 2]),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    state = read_whole(Checkpoint(tmp_path, "ckpt"), ["ids", "a", "b"])
    assert list(state) == ["ids", "a", "b"]
    for name, tensor in tensors.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor)
    save_file({"a": torch.tensor([0.0, float("nan")])}, tmp_path / "model.safetensors")
    with pytest.raises(mergecli.MergeError, match="'a'"):
        read_whole(Checkpoint(tmp_path, "ckpt"), ["a"])
