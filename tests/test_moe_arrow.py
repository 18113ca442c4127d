"""mergecli moe with LoRA experts: an Arrow MoE on peft's Arrow support."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import mergecli
from mergecli.moe import load, plan_moe
from mergecli.moe.arrow import module_stats
from scripts.fixtures import make_adapter
from tests.helpers import run_cli, write_recipe

TASKS = ("t0", "t1", "t2")
GENERAL = ("g0", "g1")
INPUT = torch.tensor([[1, 5, 9, 13, 17, 21, 30, 2]])


@pytest.fixture(scope="session")
def loras(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five rank-4 LoRA adapters of the zoo's base (three task experts, two general)."""
    root = tmp_path_factory.mktemp("arrow")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    for i, name in enumerate((*TASKS, *GENERAL)):
        make_adapter(zoo / "base", root / name, config, seed=70 + i, scale=0.3)
    return root


def recipe(zoo: Path, loras: Path, folder: Path, general: bool, **moe: object) -> Path:
    section: dict[str, object] = {"top_k": 2, "router_temperature": 0.5, **moe}
    if general:
        section["general"] = [str(loras / g) for g in GENERAL]
    spec = {
        "base_model": str(zoo / "base"),
        "models": [{"model": str(loras / t)} for t in TASKS],
        "moe": section,
        "seed": 3,
        "output": str(folder / "out"),
    }
    return write_recipe(folder, spec)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("general", [False, True], ids=["arrow", "genknowsub"])
def test_loaded_output_equals_create_arrow_model_on_the_sources(
    zoo: Path, loras: Path, tmp_path: Path, general: bool
) -> None:
    result = run_cli("moe", recipe(zoo, loras, tmp_path, general), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["manifest"]["arrow_config"]["use_gks"] is general
    out = tmp_path / "out"
    model = load(out, LlamaForCausalLM.from_pretrained(zoo / "base"))
    reference = create_arrow_model(
        LlamaForCausalLM.from_pretrained(zoo / "base"),
        [str(loras / t) for t in TASKS],
        ArrowConfig(top_k=2, router_temperature=0.5, use_gks=general, rng_seed=3),
        general_adapter_paths=[str(loras / g) for g in GENERAL] if general else None,
    )
    base = logits(LlamaForCausalLM.from_pretrained(zoo / "base"))
    got, want = logits(model), logits(reference)
    assert not torch.allclose(want, base, atol=1e-3)  # the experts change the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the folder holds the sources' adapters unchanged, and the card the plain peft recipe
    for t in TASKS:
        stored = load_file(out / "experts" / t / "adapter_model.safetensors")
        source = load_file(loras / t / "adapter_model.safetensors")
        assert stored.keys() == source.keys()
        assert all(torch.equal(stored[k], source[k]) for k in stored)
    card = (out / "README.md").read_text()
    assert "create_arrow_model(" in card and "library_name: peft" in card
    assert ("general_adapter_paths" in card) is general


def dense_factors(folder: Path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    state = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    a = state[f"{key}.lora_A.weight"].double()
    b = state[f"{key}.lora_B.weight"].double()
    return a, b, config["lora_alpha"] / config["r"]


@pytest.mark.parametrize("general", [False, True], ids=["arrow", "genknowsub"])
def test_prototypes_equal_an_independent_svd(
    zoo: Path, loras: Path, tmp_path: Path, general: bool
) -> None:
    plan = plan_moe(mergecli.load_recipe(recipe(zoo, loras, tmp_path, general)))
    assert len(plan.modules) == 3 * 3  # q, v, up in three layers
    for module in plan.modules:
        stats = module_stats(plan.adapters, plan.general, module)
        mean_a = mean_b = 0.0
        if general:
            factors = [dense_factors(loras / g, module) for g in GENERAL]
            mean_a = sum(f[0] for f in factors) / len(factors)
            mean_b = sum(f[1] for f in factors) / len(factors)
        for e, t in enumerate(TASKS):
            a, b, scale = dense_factors(loras / t, module)
            delta = scale * (b - mean_b) @ (a - mean_a)
            _, s, vh = torch.linalg.svd(delta)
            assert abs(float(stats.prototypes[e] @ vh[0])) == pytest.approx(1, abs=1e-9)
            assert stats.share[e] == pytest.approx(float(s[0] ** 2 / (s**2).sum()), abs=1e-9)
        cos = stats.cosines
        assert cos[0][1] == pytest.approx(abs(float(stats.prototypes[0] @ stats.prototypes[1])))


def test_report_gives_layers_and_modules(zoo: Path, loras: Path, tmp_path: Path) -> None:
    assert run_cli("moe", recipe(zoo, loras, tmp_path, True), "-q").exit_code == 0
    report = json.loads((tmp_path / "out" / "moe_report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert len(report["modules"]) == 9
    for row in report["layers"]:
        assert 0 <= row["mean_abs_cosine"] <= 1
        assert all(0 < s <= 1 for s in row["singular_value_share"])
    assert (
        "| layer | modules | mean abs cosine | t0 | t1 | t2 |"
        in (tmp_path / "out" / "moe_report.md").read_text()
    )


def test_dry_run_reads_no_tensor_and_writes_nothing(zoo: Path, loras: Path, tmp_path: Path) -> None:
    result = run_cli("moe", recipe(zoo, loras, tmp_path, False), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "arrow" and summary["rank"] == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"top_k": 4}, "moe.top_k: 4 experts per token, but the recipe has 3 experts"),
        ({"gate_mode": "random"}, "moe.gate_mode: not used by an Arrow MoE"),
        ({"router_temperature": 0}, "moe.router_temperature: Input should be greater than 0"),
        ({"topk": 2}, "unknown key 'moe.topk' (did you mean 'top_k'?)"),
    ],
)
def test_bad_recipes_fail_in_one_line(
    zoo: Path, loras: Path, tmp_path: Path, moe: dict, message: str
) -> None:
    result = run_cli("moe", recipe(zoo, loras, tmp_path, False, **moe))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_adapters_arrow_cannot_route_are_refused(
    zoo: Path, loras: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    path = recipe(zoo, loras, tmp_path, False)
    spec = mergecli.load_recipe(path)
    spec.models[1].model = str(adapters["lora8"])  # rank pattern 4/8 and a saved lm_head
    with pytest.raises(mergecli.MergeError, match="modules_to_save"):
        plan_moe(spec)
    spec.models[1].model = str(adapters["ia3"])
    with pytest.raises(mergecli.MergeError, match="Arrow routes LoRA adapters, not IA3"):
        plan_moe(spec)


def test_existing_output_needs_force(zoo: Path, loras: Path, tmp_path: Path) -> None:
    path = recipe(zoo, loras, tmp_path, False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    result = run_cli("moe", path)
    assert result.exit_code == 2 and "exists; use --force" in result.output
    assert (tmp_path / "out" / "keep").exists()
    assert run_cli("moe", path, "--force", "-q").exit_code == 0
    assert not (tmp_path / "out" / "keep").exists()
