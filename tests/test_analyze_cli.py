"""The `analyze interference` command: JSON names, terminal tables and readable PNG figures."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from matplotlib.image import imread

import mergecli
from mergecli.analyze import analyze_interference
from mergecli.analyze.plots import LABELS, heatmap
from tests.conftest import EXPERTS
from tests.helpers import run_cli, write_recipe

FIGURES = ("sign_conflict", "overlap", "magnitude_ratio", "cosine")


@pytest.fixture(scope="module")
def analysis_dir(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with recipe.yaml (a dare_ties recipe: its method does not matter)."""
    folder = tmp_path_factory.mktemp("analysis")
    write_recipe(
        folder,
        {
            "merge_method": "dare_ties",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n)} for n in EXPERTS],
            "parameters": {"density": 0.5},
            "output": "merged",
        },
    )
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_json_names_and_values(analysis_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(analysis_dir)  # RECIPE defaults to ./recipe.yaml
    result = run_cli("analyze", "interference", "--json", "--top-k", "0.25")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["experts"] == list(EXPERTS) and data["top_k"] == 0.25
    model = data["model"]
    for name in FIGURES:
        assert len(model[name]["matrix"]) == 3 and isinstance(model[name]["mean"], float)
    for name in ("variance", "ties_sign_conflict", "tall_selfish", "tall_catastrophic"):
        assert isinstance(model[name], float)
    assert len(model["norm"]) == 3 and len(data["layers"]) == 3 and len(data["blocks"]) == 15
    assert data["passes"] == 3 and data["bytes_read"] > 0 and data["peak_rss_bytes"] > 0
    direct = analyze_interference(mergecli.load_recipe(analysis_dir / "recipe.yaml"), top_k=0.25)
    assert model == direct["model"] and data["layers"] == direct["layers"]


def test_tables_on_the_terminal(analysis_dir: Path) -> None:
    result = run_cli("analyze", "interference", analysis_dir / "recipe.yaml", "--blocks")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in (
        "expert pairs (whole model)",
        "math × code",
        "mean over pairs",
        "top-k threshold",
        "TIES conflict %",
        "per layer",
        "model.layers.2",
        "per block",
        "model.layers.0.post_attention_layernorm",
    ):
        assert needle in text, needle


def test_plots_are_written_and_readable(analysis_dir: Path, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    result = run_cli("analyze", "interference", analysis_dir / "recipe.yaml", "--plot", plots)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted([f"{f}.png" for f in FIGURES] + ["layers.png"])
    for path in plots.iterdir():
        width, height = png_size(path)
        assert width >= 400 and height >= 400 and path.stat().st_size > 15_000, path
        pixels = imread(path)
        assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05, path
        assert f"wrote {path}" in result.stdout


def test_heatmap_has_names_colour_bar_and_values(zoo: Path) -> None:
    recipe = mergecli.recipe.recipe_from_dict(
        {"merge_method": "linear", "base_model": str(zoo / "base"), "models": [
            {"model": str(zoo / n)} for n in EXPERTS
        ]}
    )  # fmt: skip
    result = analyze_interference(recipe)
    for name in FIGURES:
        fig = heatmap(result["model"], name, list(EXPERTS), f"title {name}")
        main, bar = fig.axes
        assert [t.get_text() for t in main.get_xticklabels()] == list(EXPERTS)
        assert [t.get_text() for t in main.get_yticklabels()] == list(EXPERTS)
        assert bar.get_ylabel() == LABELS[name] and main.get_title() == f"title {name}"
        cells = [t.get_text() for t in main.texts]
        assert len(cells) == 9
        assert cells[1] == f"{result['model'][name]['matrix'][0][1]:.3g}"


def test_errors_are_one_line(analysis_dir: Path, tmp_path: Path) -> None:
    missing = run_cli("analyze", "interference", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.output
    bad = run_cli("analyze", "interference", analysis_dir / "recipe.yaml", "--top-k", "1.5")
    assert bad.exit_code == 2 and "--top-k: 1.5 is not in (0, 1]" in bad.stderr
