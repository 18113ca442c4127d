"""conventions: mergecli | mergekit at the recipe level, planned from headers alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mergecli
from mergecli.chat_template import resolve_chat_template
from mergecli.conventions import mergekit_position
from mergecli.errors import RecipeError
from mergecli.params import resolve_value
from mergecli.recipe import recipe_from_dict
from tests.helpers import run_cli, write_recipe


def plan(zoo: Path, method: str, **extra: Any) -> mergecli.MergePlan:
    data = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in ("math", "code")],
        **extra,
    }
    return mergecli.plan_merge(recipe_from_dict(data))


def merged_params(p: mergecli.MergePlan) -> dict[str, Any]:
    return next(t.params for t in p.tensors if t.merge)


def test_default_conventions_warn_once_about_differing_defaults(zoo: Path) -> None:
    warnings = plan(zoo, "dare_ties").warnings
    (line,) = [w for w in warnings if "differ from mergekit" in w]
    assert "density (mergecli 0.5, mergekit 1.0)" in line
    assert "normalize (mergecli True, mergekit False)" in line
    assert "conventions: mergekit" in line
    given = plan(zoo, "dare_ties", parameters={"density": 0.5, "normalize": True})
    assert not [w for w in given.warnings if "differ from mergekit" in w]
    assert not [w for w in plan(zoo, "task_arithmetic").warnings if "mergekit" in w]


def test_mergekit_conventions_take_mergekit_defaults(zoo: Path) -> None:
    p = merged_params(plan(zoo, "ties", conventions="mergekit"))
    assert p["density"] == [1.0, 1.0] and p["scope"] == "tensor"
    assert p["conventions"] == "mergekit"
    p = merged_params(plan(zoo, "della", conventions="mergekit"))
    assert p["epsilon"] == [0.15, 0.15]
    assert not [w for w in plan(zoo, "ties", conventions="mergekit").warnings if "differ" in w]


def test_a_listed_base_is_dropped_under_mergekit_and_warned_about_otherwise(zoo: Path) -> None:
    models = [
        {"model": str(zoo / "base")},
        {"model": str(zoo / "math")},
        {"model": str(zoo / "code")},
    ]
    kept = plan(zoo, "task_arithmetic", models=models)
    assert len(kept.experts) == 3
    assert any("is the base model" in w for w in kept.warnings)
    dropped = plan(zoo, "task_arithmetic", models=models, conventions="mergekit")
    assert [e.path.name for e in dropped.experts] == ["math", "code"]


def test_mergekit_slerp_interpolates_from_the_base(zoo: Path) -> None:
    models = [{"model": str(zoo / "base")}, {"model": str(zoo / "math")}]
    p = plan(zoo, "slerp", models=models, conventions="mergekit", parameters={"t": 0.5})
    assert len(p.experts) == 1
    with pytest.raises(mergecli.MergeError, match="exactly 2"):
        plan(zoo, "slerp", models=models[1:])


def test_mergekit_filter_rules_and_positions() -> None:
    raw = [{"value": 1.0}, {"filter": "mlp", "value": 2.0}]
    assert resolve_value(raw, "model.layers.0.mlp.up_proj.weight", 0, "mergecli") == 2.0
    assert resolve_value(raw, "model.layers.0.mlp.up_proj.weight", 0, "mergekit") == 1.0
    star = [{"filter": "*", "value": 3.0}, {"filter": "mlp", "value": 2.0}]
    assert resolve_value(star, "x.mlp.w", 0, "mergekit") == 3.0
    assert resolve_value(star, "x.mlp.w", 0, "mergecli") == 2.0
    assert resolve_value(star, "x.attn.w", 0, "mergecli") is None
    assert mergekit_position("lm_head.weight", 4) == 0.0
    assert mergekit_position("model.norm.weight", 4) == 0.0
    assert mergekit_position("model.layers.3.mlp.w", 4) == 1.0
    assert mergekit_position("model.layers.0.mlp.w", 1) == 1.0


def test_mergekit_output_dtype_follows_dtype(zoo: Path) -> None:
    assert plan(zoo, "linear", dtype="bfloat16").out_dtype == torch.float32
    assert plan(zoo, "linear", dtype="bfloat16", conventions="mergekit").out_dtype == torch.bfloat16


def test_conventions_flag_and_bad_values(zoo: Path, tmp_path: Path) -> None:
    data = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / "math")}],
    }
    path = write_recipe(tmp_path, data, "r.yaml")
    result = run_cli("merge", path, "--dry-run", "--json", "--conventions", "mergekit")
    assert result.exit_code == 0, result.output
    assert "differ from mergekit" not in result.output
    result = run_cli("merge", path, "--dry-run", "--conventions", "mergekt")
    assert result.exit_code == 2 and "--conventions" in result.output
    result = run_cli("merge", path, "--dry-run", "--executor", "dask")
    assert result.exit_code == 2 and "--executor" in result.output and "'ray'" in result.output
    with pytest.raises(mergecli.MergeError, match="conventions"):
        recipe_from_dict({**data, "conventions": "other"})


def test_tokenizer_keys_parse(zoo: Path) -> None:
    base = {"merge_method": "linear", "models": [{"model": str(zoo / "math")}]}
    recipe = recipe_from_dict({**base, "chat_template": "auto"})
    assert recipe.chat_template == "auto"
    assert recipe_from_dict({**base, "tokenizer_source": "union"}).tokenizer_source == "union"
    section = {"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}}}}
    parsed = recipe_from_dict({**base, "tokenizer": section}).tokenizer
    assert parsed is not None and parsed.tokens is not None
    assert parsed.tokens["<x>"].source is not None


def test_chat_template_text_and_auto(zoo: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    data = {
        "merge_method": "linear",
        "models": [{"model": str(zoo / "math")}, {"model": str(zoo / "code")}],
        "chat_template": template,
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, data, "r.yaml"), "--quiet")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert written["chat_template"] == template
    assert resolve_chat_template("auto", [tmp_path / "out", zoo / "math"]) == template
    with pytest.raises(RecipeError, match="chat_template"):
        recipe_from_dict({**data, "chat_template": "chatml"})


def test_docs_conventions_table_matches_the_registry() -> None:
    from scripts.methods_table import (
        CONVENTIONS_BEGIN,
        CONVENTIONS_END,
        conventions_table,
        readme_table,
    )

    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert readme_table(docs, CONVENTIONS_BEGIN, CONVENTIONS_END) == conventions_table()
