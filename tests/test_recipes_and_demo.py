"""The example recipes in recipes/ run against the demo checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from scripts.fixtures import make_demo
from tests.helpers import ROOT, load_state, run_cli

pytestmark = pytest.mark.slow  # runs every example recipe and the demo end to end

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-root")
    recipe = make_demo(root / "demo")
    assert run_cli("merge", recipe, "--quiet").exit_code == 0
    shutil.copytree(ROOT / "recipes", root / "recipes")
    return root


def test_demo_recipe_merges(demo_root: Path) -> None:
    assert (demo_root / "demo" / "merged" / "merge_report.json").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_runs(demo_root: Path, recipe: Path) -> None:
    result = run_cli("merge", demo_root / "recipes" / recipe.name, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    output = (demo_root / "recipes" / yaml.safe_load(recipe.read_text())["output"]).resolve()
    assert set(load_state(output)) == set(load_state(demo_root / "demo" / "base"))
