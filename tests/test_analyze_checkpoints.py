"""`analyze interference --over-checkpoints`: training runs whose experts grow idiosyncratic.

At stage 0 every expert's top-20 % holds a shared part (same values in all experts) and a part
of its own (disjoint supports): no sign conflict, ratio 1. With each stage a growing random share
of the entries (3 % more per stage, nested) gets large, idiosyncratic updates of growing size, as
memorisation does late in training (upcycling paper, Appendix I): every interference figure rises.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergecli.analyze import analyze_interference, analyze_over_checkpoints
from mergecli.analyze.runs import sweep_points
from mergecli.recipe import recipe_from_dict
from tests.helpers import run_cli, write_recipe

SHAPES = {
    "lm_head.weight": (64, 16),
    "model.embed_tokens.weight": (64, 16),
    **{
        f"model.layers.{i}.{m}": s
        for i in range(2)
        for m, s in (
            ("input_layernorm.weight", (16,)),
            ("self_attn.q_proj.weight", (16, 16)),
            ("mlp.up_proj.weight", (32, 16)),
        )
    },
}
STAGES = 5
EXPERTS = 3
RISING = ("sign_conflict", "overlap", "magnitude_ratio", "variance", "ties_sign_conflict")


def stage_task_vectors(stage: int) -> list[torch.Tensor]:
    """Flat task vectors of every expert at one stage (same draws at every stage)."""
    n = sum(torch.Size(s).numel() for s in SHAPES.values())
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(n, generator=gen)
    shared, own = perm[:80], perm[80:].chunk(EXPERTS)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shared_value = sign * (0.9 + 0.1 * torch.rand(n, generator=gen))
    out = []
    for t in range(EXPERTS):
        own_value = sign.roll(t + 1) * (0.5 + 0.4 * torch.rand(n, generator=gen))
        order = torch.randperm(n, generator=gen)
        noise = torch.randn(n, generator=gen)
        tau = torch.zeros(n)
        tau[shared] = shared_value[shared]
        tau[own[t][:720]] = own_value[own[t][:720]]
        late = order[: int(0.03 * stage * n)]
        tau[late] = noise[late].sign() * (1 + (1 + stage) * noise[late].abs())
        out.append(tau)
    return out


def save_flat(flat: torch.Tensor, base: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True)
    state, start = {}, 0
    for name, shape in SHAPES.items():
        size = torch.Size(shape).numel()
        state[name] = base[name] + flat[start : start + size].reshape(shape)
        start += size
    save_file(state, folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/, runs/e0 and runs/e1 at steps 100…500, runs/e2 at steps 200…1000 (same stages)."""
    root = tmp_path_factory.mktemp("runs")
    gen = torch.Generator().manual_seed(1)
    base = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    save_flat(torch.zeros(sum(torch.Size(s).numel() for s in SHAPES.values())), base, root / "base")
    for stage in range(STAGES):
        for t, tau in enumerate(stage_task_vectors(stage)):
            step = (stage + 1) * (200 if t == 2 else 100)
            save_flat(tau, base, root / "runs" / f"e{t}" / f"checkpoint-{step}")
    return root


def sweep_recipe(root: Path, experts: int = EXPERTS) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "runs" / f"e{t}")} for t in range(experts)],
    }


def test_interference_rises_with_training(runs: Path, tmp_path: Path) -> None:
    sweep = analyze_over_checkpoints(recipe_from_dict(sweep_recipe(runs)), match="fraction")
    points = sweep["points"]
    assert [p["fraction"] for p in points] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [p["steps"] for p in points] == [[s, s, 2 * s] for s in (100, 200, 300, 400, 500)]
    assert sweep["experts"] == ["e0", "e1", "e2"]
    first = points[0]["model"]
    assert first["sign_conflict"]["mean"] == 0.0 and first["magnitude_ratio"]["mean"] == 1.0
    for metric in RISING:
        values = [p["model"][metric] for p in points]
        values = [v["mean"] if isinstance(v, dict) else v for v in values]
        assert all(a < b for a, b in itertools.pairwise(values)), (metric, values)
    cosines = [p["model"]["cosine"]["mean"] for p in points]
    assert all(a > b for a, b in itertools.pairwise(cosines)), cosines
    # each point is the plain analysis of its checkpoints
    last = points[-1]
    direct = analyze_interference(
        recipe_from_dict(
            {
                "merge_method": "linear",
                "base_model": str(runs / "base"),
                "models": [
                    {"model": p, "name": f"e{t}"} for t, p in enumerate(last["checkpoints"])
                ],
            }
        )
    )
    assert direct["model"] == last["model"] and direct["experts"] == sweep["experts"]


def test_matching_by_step_keeps_common_steps(runs: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(sweep_recipe(runs))
    assert [p.step for p in sweep_points(recipe, "step")] == [200, 400]
    two = analyze_over_checkpoints(recipe_from_dict(sweep_recipe(runs, 2)), match="step")
    assert [p["step"] for p in two["points"]] == [100, 200, 300, 400, 500]
    overlaps = [p["model"]["overlap"]["mean"] for p in two["points"]]
    assert overlaps == sorted(overlaps) and overlaps[0] < overlaps[-1]


def test_a_plain_expert_is_the_same_at_every_point(runs: Path) -> None:
    recipe = sweep_recipe(runs, 2)
    recipe["models"][1]["model"] = str(runs / "runs" / "e1" / "checkpoint-300")
    points = sweep_points(recipe_from_dict(recipe), "step")
    assert [p.steps for p in points] == [[s, None] for s in (100, 200, 300, 400, 500)]
    assert {p.paths[1] for p in points} == {runs / "runs" / "e1" / "checkpoint-300"}


@pytest.mark.slow
def test_sweep_cli_json_table_and_plot(runs: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, sweep_recipe(runs))
    result = run_cli(
        "analyze", "interference", path, "--over-checkpoints", "--match", "fraction",
        "--plot", tmp_path / "plots", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["match"] == "fraction" and len(data["points"]) == STAGES
    assert data["plots"] == [str(tmp_path / "plots" / "checkpoints.png")]
    png = (tmp_path / "plots" / "checkpoints.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = run_cli("analyze", "interference", path, "--over-checkpoints")  # --match step
    assert table.exit_code == 0, table.output
    assert "interference over training" in table.stdout and "e2@400" in table.stdout
    bad = run_cli("analyze", "interference", path, "--over-checkpoints", "--match", "steps")
    assert bad.exit_code == 2 and "did you mean 'step'" in bad.stderr
