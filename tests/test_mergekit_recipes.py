"""mergekit 0.1.5's example and test recipes (tests/mergekit_recipes, their facts adapted to
tiny Llama models) run unchanged: under --conventions mergekit they merge, and in mergecli's
default conventions the ones that rely on defaults that differ get the one warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mergecli
from mergecli.conventions import unset_differing
from mergecli.recipe import recipe_from_dict
from tests.helpers import load_state, run_cli

RECIPES = Path(__file__).parent / "mergekit_recipes"
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def adapted(name: str, zoo: Path) -> str:
    """The recipe's text with its models placed on the tiny zoo ($A, $B, $D experts, $C base)."""
    text = (RECIPES / f"{name}.yaml").read_text()
    for key, folder in (("$A", "math"), ("$B", "code"), ("$C", "base"), ("$D", "chat")):
        text = text.replace(key, str(zoo / folder))
    return text


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_mergekit_recipe_merges_under_mergekit_conventions(
    zoo: Path, tmp_path: Path, name: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(adapted(name, zoo))
    out = tmp_path / "out"
    args = ("merge", path, "--output", out, "--conventions", "mergekit", "--quiet")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    state = load_state(out)
    dtype = getattr(torch, yaml.safe_load(path.read_text())["dtype"])
    assert state and all(t.dtype == dtype for t in state.values() if t.is_floating_point())
    assert all(bool(torch.isfinite(t.float()).all()) for t in state.values())


@pytest.mark.parametrize("name", NAMES)
def test_default_conventions_warn_where_mergekit_defaults_differ(zoo: Path, name: str) -> None:
    recipe = recipe_from_dict(yaml.safe_load(adapted(name, zoo)))
    method = mergecli.get_method(recipe.merge_method)
    unset = unset_differing(recipe, method)
    try:
        plan = mergecli.plan_merge(recipe)
    except mergecli.MergeError as exc:
        # a listed base stays an expert under mergecli's conventions: one expert too many
        assert "needs exactly" in str(exc), exc
        return
    warned = [w for w in plan.warnings if "differ from mergekit" in w]
    assert len(warned) == (1 if unset else 0)
    for param in unset:
        assert param.name in warned[0]


def test_mergekit_della_refuses_an_epsilon_out_of_range(zoo: Path) -> None:
    """mergekit's test_della_invalid_epsilon: density ± epsilon must stay in (0, 1)."""
    data = yaml.safe_load(adapted("della", zoo))
    data["parameters"]["epsilon"] = 1.35
    data["conventions"] = "mergekit"
    with pytest.raises(mergecli.MergeError, match="density ± epsilon"):
        mergecli.plan_merge(recipe_from_dict(data))


def test_mergekit_recipes_cover_the_shared_methods() -> None:
    methods = {yaml.safe_load((RECIPES / f"{n}.yaml").read_text())["merge_method"] for n in NAMES}
    assert len(NAMES) >= 20
    assert {"nuslerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl"} <= methods


def test_mergekit_passthrough_tests_hold(zoo: Path, tmp_path: Path) -> None:
    """mergekit's passthrough tests: a copy is the model, two full stacks double the depth
    (layer k and k + 3 both layer k), a scale filtered to o_proj zeroes only those."""
    a = load_state(zoo / "math")
    got = {}
    for name in ("passthrough_copy", "passthrough_stack", "passthrough_scale"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(adapted(name, zoo))
        out = tmp_path / name
        result = run_cli("merge", path, "--output", out, "--conventions", "mergekit", "--quiet")
        assert result.exit_code == 0, result.output
        got[name] = load_state(out)
    assert got["passthrough_copy"].keys() == a.keys()
    assert all(torch.equal(got["passthrough_copy"][n], a[n].bfloat16()) for n in a)
    stack = got["passthrough_stack"]
    config = json.loads((tmp_path / "passthrough_stack" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for name, value in a.items():
        parts = name.split(".")
        if parts[1] != "layers":
            assert torch.equal(stack[name], value.bfloat16())
            continue
        for k in (int(parts[2]), int(parts[2]) + 3):
            assert torch.equal(stack[".".join([*parts[:2], str(k), *parts[3:]])], value.bfloat16())
    scaled = got["passthrough_scale"]
    assert any("o_proj" in n for n in a)
    for name, value in a.items():
        want = torch.zeros_like(value) if "o_proj" in name else value
        assert torch.equal(scaled[name], want), name
