"""`mergecli inspect`: checkpoints, PEFT adapters and training runs, from headers and configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from tests.helpers import load_state, run_cli


def inspect_json(path: Path) -> dict:
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(("zoo_name", "dtype"), [("zoo", "float32"), ("zoo_bf16", "bfloat16")])
def test_checkpoint(zoo_name: str, dtype: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(zoo_name) / "base"
    info = inspect_json(folder)
    state = load_state(folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert info["kind"] == "checkpoint"
    assert info["config"]["architectures"] == ["LlamaForCausalLM"]
    assert info["config"]["num_hidden_layers"] == info["layers"] == 3
    assert info["tensors"] == len(state)
    assert info["parameters"] == sum(t.numel() for t in state.values())
    assert info["dtypes"] == {dtype: info["parameters"]}
    assert [s["file"] for s in info["shards"]] == [s.name for s in shards]
    assert sum(s["tensors"] for s in info["shards"]) == len(state)
    assert info["weights_bytes"] == sum(s.stat().st_size for s in shards)
    assert info["size_on_disk"] == disk_bytes(folder)
    text = run_cli("inspect", folder)
    assert text.exit_code == 0
    for needle in (
        "LlamaForCausalLM",
        f"{info['parameters']:,}",
        "model-00001-of-",
        "size on disk",
    ):
        assert needle in text.stdout


def test_lora_adapter(zoo: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    adapter = tmp_path / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    info = inspect_json(adapter)
    assert info["kind"] == "adapter"
    described = info["adapter"]
    assert described["type"] == "LORA" and described["rank"] == 4 and described["alpha"] == 8
    assert described["targets"] == ["q_proj", "v_proj"]
    assert described["base"] == str(zoo / "base") and described["use_rslora"] is True
    assert info["tensors"] == 12  # 3 layers × 2 targets × (A, B)
    # per layer: A (r × 32) and B (out × r) of q_proj (out 32) and v_proj (out 2 heads × 8)
    assert info["parameters"] == 3 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    text = run_cli("inspect", adapter)
    assert "adapter rank" in text.stdout and "q_proj, v_proj" in text.stdout


def test_training_run(zoo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (500, 50):
        shutil.copytree(zoo / "math", run / f"checkpoint-{step}")
    info = inspect_json(run)
    assert info["kind"] == "training_run" and "tensors" not in info
    assert [c["step"] for c in info["checkpoints"]] == [50, 500]
    assert info["checkpoints"][0]["bytes"] == disk_bytes(run / "checkpoint-50")
    assert info["size_on_disk"] == disk_bytes(run)
    assert "step 500: checkpoint-500" in run_cli("inspect", run).stdout


def test_errors(tmp_path: Path, zoo: Path) -> None:
    for path, message in (
        (tmp_path / "nope", "does not exist"),
        (zoo / "base" / "config.json", "is a file"),
        (tmp_path, "holds no weights"),
    ):
        result = run_cli("inspect", path)
        assert result.exit_code == 2 and message in result.stderr, result.output
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    broken = run_cli("inspect", tmp_path)
    assert broken.exit_code == 2 and "adapter_config.json" in broken.stderr
