"""PEFT adapters as experts: merges equal the same merge of peft's merge_and_unload models."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from mergecli.sources import Adapter
from scripts.fixtures import make_adapter
from tests.conftest import ADAPTERS
from tests.helpers import load_state, run_cli, write_recipe

WEIGHTS = (1.0, 0.5, 2.0)


def merge(tmp: Path, name: str, method: str, models: list[Path], base: Path | None) -> dict:
    recipe = {
        "merge_method": method,
        **({"base_model": str(base)} if base else {}),
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in zip(models, WEIGHTS, strict=False)
        ],
        "out_dtype": "float32",
        "output": str(tmp / name),
    }
    result = run_cli("merge", write_recipe(tmp, recipe, f"{name}.yaml"), "--quiet")
    assert result.exit_code == 0, result.output
    return load_state(tmp / name)


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        err = (got[key] - value).abs().max().item()
        assert err <= 1e-6, f"{key}: max abs error {err}"


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "dare_linear"])
def test_lora_and_ia3_experts_equal_merged_full_models(
    zoo: Path, adapters: dict[str, Path], tmp_path: Path, method: str
) -> None:
    names = list(ADAPTERS)
    got = merge(tmp_path, "a", method, [adapters[n] for n in names], zoo / "base")
    want = merge(tmp_path, "f", method, [adapters[f"{n}_full"] for n in names], zoo / "base")
    assert_same(got, want)


def test_each_adapter_task_vector_is_peft_delta(
    zoo: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    base = load_state(zoo / "base")
    for name in ADAPTERS:
        full = load_state(adapters[f"{name}_full"])
        got = merge(tmp_path, name, "task_arithmetic", [adapters[name]], None)
        assert_same(got, full)
        changed = {k for k in base if not torch.equal(full[k], base[k])}
        assert changed, name  # the adapter really changes the model
        untouched = [k for k in base if k not in changed]
        assert all(torch.equal(got[k], base[k]) for k in untouched)


def test_bfloat16_base_uses_adapter_base_and_equals_peft(
    zoo_bf16: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    got = merge(tmp_path, "bf16", "task_arithmetic", [adapters["lora8_bf16"]], None)
    assert_same(got, load_state(adapters["lora8_bf16_full"]))
    base = load_state(zoo_bf16 / "base")
    assert next(iter(base.values())).dtype == torch.bfloat16


def test_adapter_holds_one_task_vector_at_a_time(
    zoo: Path, adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each task vector is computed when its tensor is read and freed before the next one."""
    alive: set[int] = set()
    peak = [0]
    reads: list[str] = []
    original = Adapter.read

    def tracked(self: Adapter, name: str) -> torch.Tensor:
        out = original(self, name)
        reads.append(name)
        alive.add(id(out))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(out, alive.discard, id(out))
        return out

    monkeypatch.setattr(Adapter, "read", tracked)
    merge(tmp_path, "m", "task_arithmetic", [adapters[n] for n in ADAPTERS], zoo / "base")
    base = load_state(zoo / "base")
    assert sorted(reads) == sorted(list(base) * len(ADAPTERS))
    assert peak[0] == 1


def test_different_bases_are_an_error(adapters: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "task_arithmetic",
        "models": [{"model": str(adapters["lora8"])}, {"model": str(adapters["lora8_bf16"])}],
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2
    assert "must share their base" in result.output
    assert not (tmp_path / "out").exists()


def test_dora_and_prompt_tuning_are_refused(zoo: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    dora = make_adapter(zoo / "base", tmp_path / "dora", config, 1)
    prompt = tmp_path / "prompt"
    PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, base_model_name_or_path=str(zoo / "base")
    ).save_pretrained(prompt)
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, prompt / "adapter_model.safetensors")
    for folder, words in ((dora, "use_dora: DoRA"), (prompt, "PROMPT_TUNING adapters")):
        recipe = {"merge_method": "task_arithmetic", "models": [{"model": str(folder)}]}
        result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
        assert result.exit_code == 2
        assert words in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_adapter_not_matching_base_names_the_tensor(
    zoo: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((adapters["lora8"] / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    save_file(
        {key: torch.zeros(8, 32), key.replace("_A", "_B"): torch.zeros(32, 8)},
        broken / "adapter_model.safetensors",
    )
    recipe = {"merge_method": "task_arithmetic", "models": [{"model": str(broken)}]}
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "model.layers.9.self_attn.q_proj.weight" in result.output


def test_analyze_interference_on_lora_experts(
    zoo: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """The adapters' base is found without base_model; the figures are those of the
    merged full models."""
    names = ("lora8", "rslora16")
    lora = {"merge_method": "ties", "models": [{"model": str(adapters[n])} for n in names]}
    full = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(adapters[f"{n}_full"]), "name": n} for n in names],
    }
    got, want = (
        run_cli("analyze", "interference", write_recipe(tmp_path, r, f"{k}.yaml"), "--json")
        for k, r in (("lora", lora), ("full", full))
    )
    assert got.exit_code == 0, got.output
    a, b = (numbers(json.loads(r.stdout)["model"]) for r in (got, want))
    assert len(a) == len(b) > 0
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def numbers(value: object) -> list[float]:
    """Every number in a JSON value, in order (None as nan)."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in numbers(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [float("nan") if value is None else float(value)]


def test_fan_in_fan_out_lora_bias_and_ia3_biases_on_gpt2(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers store W transposed (fan_in_fan_out) and have biases: LoRA with a
    trained bias and (IA)³ scaling outputs and biases, against peft's merge_and_unload."""
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    lora = LoraConfig(
        r=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, lora_bias=True
    )
    ia3 = IA3Config(
        target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True,
    )
    experts = []
    for i, (name, cfg) in enumerate((("lora", lora), ("ia3", ia3))):
        folder = make_adapter(base, tmp_path / name, cfg, seed=i, model_class=GPT2LMHeadModel)
        model = GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(model, folder).merge_and_unload().save_pretrained(
            tmp_path / f"{name}_full"
        )
        experts.append(folder)
    got = merge(tmp_path, "a", "task_arithmetic", experts, base)
    full = [tmp_path / "lora_full", tmp_path / "ia3_full"]
    want = merge(tmp_path, "f", "task_arithmetic", full, base)
    assert_same(got, want)
    start = load_state(base)
    assert not torch.equal(
        got["transformer.h.0.attn.c_attn.bias"], start["transformer.h.0.attn.c_attn.bias"]
    )
