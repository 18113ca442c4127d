"""Recipes written for mergekit run unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import load_state, run_cli

MERGEKIT_RECIPES = {
    "linear": """
models:
  - model: {zoo}/math
    parameters:
      weight: 1.0
  - model: {zoo}/code
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "task_arithmetic": """
base_model: {zoo}/base
models:
  - model: {zoo}/math
    parameters:
      weight: 0.5
  - model: {zoo}/code
    parameters:
      weight: [0, 0.5, 1]
merge_method: task_arithmetic
parameters:
  normalize: false
dtype: bfloat16
tokenizer_source: base
""",
    "ties": """
models:
  - model: {zoo}/math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {zoo}/code
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {zoo}/chat
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {zoo}/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}


@pytest.mark.parametrize("method", list(MERGEKIT_RECIPES))
def test_mergekit_recipe_runs_unchanged(zoo: Path, tmp_path: Path, method: str) -> None:
    recipe = tmp_path / "mergekit.yml"
    recipe.write_text(MERGEKIT_RECIPES[method].format(zoo=zoo))
    out = tmp_path / "out"
    result = run_cli("merge", recipe, "--output", out, "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_state(out)
    assert set(merged) == set(load_state(zoo / "base"))
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    if method == "ties":
        assert "int8_mask ignored" in result.output
    if method == "linear":
        math, code = load_state(zoo / "math"), load_state(zoo / "code")
        name = "model.layers.0.mlp.up_proj.weight"
        want = (math[name] + 0.5 * code[name]) / 1.5
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=0)
