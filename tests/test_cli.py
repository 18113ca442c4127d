"""The CLI surface: version, python -m, methods listing, JSON output."""

from __future__ import annotations

import json

import mergecli
from tests.helpers import run_cli, run_module


def test_version_and_module_entry() -> None:
    result = run_module("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mergecli {mergecli.__version__}"


def test_methods_lists_every_registered_method() -> None:
    result = run_cli("methods", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    names = [r["name"] for r in rows]
    assert names == [m.name for m in mergecli.list_methods()]
    for expected in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        assert expected in names
    ties = next(r for r in rows if r["name"] == "ties")
    params = {p["name"]: p for p in ties["parameters"]}
    assert params["density"]["default"] == 0.2 and params["density"]["per_model"]
    assert params["scope"]["choices"] == ["model", "tensor"]
    assert "scope: tensor" in ties["convention"]
    table = run_cli("methods")
    assert "task_arithmetic" in table.output


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("mrege")
    assert result.exit_code == 2


def test_readme_methods_table_matches_the_registry() -> None:
    from scripts.methods_table import methods_table, readme_table
    from tests.helpers import ROOT

    assert readme_table((ROOT / "README.md").read_text()) == methods_table()
