"""mergecli agrees with peft's ``merge_utils`` where both use the same convention.

peft trims per tensor to k = floor(density·n) entries and divides a weighted disjoint merge by
the number of agreeing experts; mergecli keeps k = ceil(density·n) and divides by Σ wt. With
density 0.25 (density·n is whole for every tensor of the tiny model) and, for TIES, unit weights,
the conventions coincide; breadcrumbs with gamma 0 and scope tensor is peft's magnitude prune.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils

from tests import dense
from tests.conftest import EXPERTS
from tests.helpers import load_state, run_cli, write_recipe

DENSITY = 0.25
WEIGHTS = (1.0, 0.5, 2.0)


def merged_deltas(zoo: Path, tmp: Path, method: str, params: dict, weights: tuple) -> dict:
    recipe = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / n), "parameters": {"weight": w}}
            for n, w in zip(EXPERTS, weights, strict=True)
        ],
        "parameters": params,
        "output": str(tmp / method),
    }
    assert run_cli("merge", write_recipe(tmp, recipe, f"{method}.yaml"), "--quiet").exit_code == 0
    base = load_state(zoo / "base")
    return {k: v - base[k] for k, v in load_state(tmp / method).items()}


CASES = {
    "task_arithmetic": (
        "task_arithmetic",
        {},
        WEIGHTS,
        lambda tvs, w: merge_utils.task_arithmetic(tvs, w),
    ),
    "magnitude_prune": (
        "breadcrumbs",
        {"density": DENSITY, "gamma": 0.0, "scope": "tensor"},
        WEIGHTS,
        lambda tvs, w: merge_utils.magnitude_prune(tvs, w, DENSITY),
    ),
    "ties_total": (
        "ties",
        {"density": DENSITY, "scope": "tensor"},
        (1.0, 1.0, 1.0),
        lambda tvs, w: merge_utils.ties(tvs, w, DENSITY, "total"),
    ),
    "ties_frequency": (
        "ties",
        {"density": DENSITY, "scope": "tensor", "sign": "count"},
        (1.0, 1.0, 1.0),
        lambda tvs, w: merge_utils.ties(tvs, w, DENSITY, "frequency"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_peft_merge_utils(zoo: Path, tmp_path: Path, case: str) -> None:
    method, params, weights, peft_merge = CASES[case]
    got = merged_deltas(zoo, tmp_path, method, params, weights)
    base, experts = dense.load_inputs(zoo)
    for name in base:
        tvs = dense.task_vectors(base, experts, name)
        assert all(float(DENSITY * tv.numel()).is_integer() for tv in tvs)
        want = peft_merge(tvs, torch.tensor(weights))
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)
