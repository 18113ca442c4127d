"""``output_format: lora``: exact concatenation for linear methods, truncated SVD otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from tests.helpers import load_state, read_json, run_cli, write_recipe

RANK = 3


def merge(tmp: Path, name: str, base: Path, models: list[Path], **options: object) -> Path:
    recipe = {
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in zip(models, (0.7, 1.3, 0.5), strict=False)
        ],
        "out_dtype": "float32",
        "output": str(tmp / name),
        **options,
    }
    result = run_cli("merge", write_recipe(tmp, recipe, f"{name}.yaml"), "--quiet")
    assert result.exit_code == 0, result.output
    return tmp / name


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft makes of the output adapter: the base with it merged in."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_linear_merge_of_loras_is_an_exact_lora(
    zoo: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    method: str,
) -> None:
    experts = [adapters["lora8"], adapters["rslora16"]]
    model = merge(tmp_path, "model", zoo / "base", experts, merge_method=method)
    lora = merge(tmp_path, "lora", zoo / "base", experts, merge_method=method, output_format="lora")
    want = load_state(model)
    got = peft_merged(zoo / "base", lora)
    for name, value in want.items():
        err = (got[name] - value).abs().max().item()
        assert err <= 1e-6, f"{name}: {err}"
    report = read_json(lora / "merge_report.json")["lora"]
    assert report["modules_to_save"] == ["lm_head"]
    modules = report["modules"]
    assert all(m["exact"] and m["energy_kept"] == 1.0 for m in modules.values())
    assert modules["model.embed_tokens"]["rank"] == 16
    assert modules["model.layers.0.self_attn.q_proj"]["rank"] == 8 + 16
    assert modules["model.layers.0.self_attn.v_proj"]["rank"] == 4
    config = read_json(lora / "adapter_config.json")
    assert config["base_model_name_or_path"] == str(zoo / "base")


def test_other_methods_truncate_with_reported_energy(
    zoo: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    experts = [adapters["lora8"], adapters["rslora16"], adapters["ia3"]]
    options = {"merge_method": "ties", "parameters": {"density": 0.5}}
    model = merge(tmp_path, "model", zoo / "base", experts, **options)
    lora = merge(
        tmp_path, "lora", zoo / "base", experts, output_format="lora", rank=RANK, **options
    )
    base, want = load_state(zoo / "base"), load_state(model)
    got = peft_merged(zoo / "base", lora)
    modules = read_json(lora / "merge_report.json")["lora"]["modules"]
    assert modules and not any(m["exact"] for m in modules.values())
    assert "| model.layers.0.self_attn.q_proj | 3 | no |" in (lora / "merge_report.md").read_text()
    for name, value in want.items():
        module = name.removesuffix(".weight")
        delta = (value - base[name]).double()
        if module not in modules:
            assert (got[name] - value).abs().max().item() <= 1e-6, name
            continue
        sigma = torch.linalg.svdvals(delta)
        energy = float(sigma[:RANK].square().sum() / sigma.square().sum())
        assert modules[module]["energy_kept"] == pytest.approx(energy, abs=1e-8), name
        residual = float((got[name].double() - value.double()).square().sum())
        assert residual == pytest.approx((1 - energy) * float(delta.square().sum()), rel=1e-3)


def test_truncation_without_rank_is_an_error(
    zoo: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(adapters["lora8"])}, {"model": str(zoo / "math")}],
        "output_format": "lora",
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2
    assert "rank: output_format lora needs a rank" in result.output
    assert not (tmp_path / "out").exists()


def test_lora_output_is_deterministic(zoo: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    experts = [adapters["lora8"], adapters["ia3"]]
    options = {"merge_method": "dare_ties", "output_format": "lora", "rank": 2}
    first, second = (merge(tmp_path, n, zoo / "base", experts, **options) for n in ("a", "b"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_rank_without_lora_output_is_an_error(zoo: Path, tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": str(zoo / "math")}], "rank": 4}
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "rank: only used with output_format: lora" in result.output
