"""An MoE output is a candidate like any merge: `mergecli evaluate` scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig

from scripts.fixtures import make_adapter
from tests.helpers import run_cli, write_recipe


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "valid.jsonl"
    lines = [{"text": " ".join(f"w{(7 * i + j) % 61}" for j in range(9))} for i in range(6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def scores(*args: object) -> list[float]:
    result = run_cli("evaluate", *args, "--json")
    assert result.exit_code == 0, result.output
    return [row["score"] for row in json.loads(result.stdout)["rows"]]


def test_sparse_moe_of_base_copies_scores_as_the_base(
    zoo: Path, texts: Path, tmp_path: Path
) -> None:
    """The evaluator loads the MoE as transformers does: experts equal to the base give the
    base's perplexity, and the recipe is scored as the MoE it builds."""
    base = zoo / "base"
    spec = {
        "base_model": str(base),
        "models": [{"model": str(base), "name": "a"}, {"model": str(base), "name": "b"}],
        "moe": {"gate_mode": "random"},
        "evaluate": {"metric": "perplexity", "data": str(texts)},
        "output": str(tmp_path / "out"),
    }
    path = write_recipe(tmp_path, spec)
    assert run_cli("moe", path, "-q").exit_code == 0
    got = scores(path, "--model", tmp_path / "out", "--model", base)
    assert got[0] == pytest.approx(got[1], rel=1e-5)
    assert scores(path)[0] == pytest.approx(got[1], rel=1e-5)


def test_arrow_moe_is_scored_over_its_base(zoo: Path, texts: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    experts = [
        make_adapter(zoo / "base", tmp_path / n, config, 90 + i, 0.3)
        for i, n in enumerate(("x", "y"))
    ]
    spec = {
        "base_model": str(zoo / "base"),
        "models": [{"model": str(e)} for e in experts],
        "moe": {"top_k": 1},
        "evaluate": {"metric": "perplexity", "data": str(texts)},
        "output": str(tmp_path / "out"),
    }
    path = write_recipe(tmp_path, spec)
    assert run_cli("moe", path, "-q").exit_code == 0
    moe, base = scores(path, "--model", tmp_path / "out", "--model", zoo / "base")
    assert moe != pytest.approx(base, rel=1e-4)
    assert scores(path)[0] == pytest.approx(moe, rel=1e-6)


def test_sweep_over_checkpoints_accepts_moe(zoo: Path, texts: Path, tmp_path: Path) -> None:
    """MoE against expert training duration, beside a merging method on the same axis."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for i, task in enumerate(("x", "y")):
        for step in (10, 20):
            folder = tmp_path / "runs" / task / f"checkpoint-{step}"
            make_adapter(zoo / "base", folder, config, 100 + 10 * i + step, 0.01 * step)
    spec = {
        "base_model": str(zoo / "base"),
        "models": [{"model": f"runs/{t}", "name": t} for t in ("x", "y")],
        "parameters": {"lambda": 0.5},
        "moe": {"top_k": 1},
        "evaluate": {"metric": "perplexity", "data": str(texts)},  # LoRA experts: not scored
    }
    path = write_recipe(tmp_path, spec)
    result = run_cli(
        "sweep",
        path,
        "--over-checkpoints",
        "--by",
        "step",
        "--methods",
        "moe,task_arithmetic",
        "-o",
        tmp_path / "sweep",
        "--json",
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert sweep["methods"] == ["moe", "task_arithmetic"]
    assert [p["x"] for p in sweep["points"]] == [10, 20]
    for point in sweep["points"]:
        moe = point["methods"]["moe"]["score"]
        ta = point["methods"]["task_arithmetic"]["score"]
        assert moe > 0 and ta > 0 and moe != pytest.approx(ta, rel=1e-6)
    bad = run_cli(
        "sweep",
        write_recipe(tmp_path, {**spec, "moe": None, "merge_method": "ties"}, "plain.yaml"),
        "--over-checkpoints",
        "--by",
        "step",
        "--methods",
        "moe",
        "-o",
        tmp_path / "bad",
    )
    assert bad.exit_code == 2 and "has none" in bad.output
