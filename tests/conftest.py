"""Shared fixtures: offline environment and tiny real checkpoints built with transformers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="mergecli-tests-"))
for _var, _sub in (("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl"), ("XDG_CACHE_HOME", "cache")):
    os.environ[_var] = str(_SANDBOX / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from scripts.fixtures import make_adapter, make_base, make_expert  # noqa: E402
from scripts.testbed import build as build_testbed  # noqa: E402

EXPERTS = ("math", "code", "chat")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 base + three experts (sharded) in one folder."""
    root = tmp_path_factory.mktemp("zoo32")
    base = make_base(root / "base")
    for i, name in enumerate(EXPERTS):
        make_expert(base, root / name, seed=10 + i)
    return root


@pytest.fixture(scope="session")
def zoo_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bfloat16 base + three experts (sharded)."""
    root = tmp_path_factory.mktemp("zoo16")
    base = make_base(root / "base", dtype=torch.bfloat16)
    for i, name in enumerate(EXPERTS):
        make_expert(base, root / name, seed=20 + i)
    return root


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced real testbed (docs/testbed.md): BERT digit base, 6 task experts, JSONL data."""
    return build_testbed(tmp_path_factory.mktemp("testbed") / "testbed", reduced=True)


ADAPTERS = {  # LoRA rank 8 with rank/alpha patterns and a saved lm_head, rsLoRA 16, (IA)³
    "lora8": LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={r"layers\.1\.mlp\.down_proj": 3},
        modules_to_save=["lm_head"],
    ),
    "rslora16": LoraConfig(
        r=16,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "embed_tokens"],
    ),
    "ia3": IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}


def merged_full(base: Path, adapter: Path, folder: Path) -> Path:
    """peft's own answer: the base in float32 with the adapter merged in."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters(
    zoo: Path, zoo_bf16: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The adapters above on the float32 base (and lora8 on the bfloat16 base), with peft's
    merged full models beside them (``<name>_full``)."""
    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, Path] = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        out[name] = make_adapter(zoo / "base", root / name, config, seed=30 + i)
        out[f"{name}_full"] = merged_full(zoo / "base", out[name], root / f"{name}_full")
    out["lora8_bf16"] = make_adapter(zoo_bf16 / "base", root / "bf16", ADAPTERS["lora8"], 40)
    out["lora8_bf16_full"] = merged_full(zoo_bf16 / "base", out["lora8_bf16"], root / "bf16_full")
    return out


@pytest.fixture(scope="session")
def zoo5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 base + five experts e0..e4 (sharded), for FlexMerge."""
    root = tmp_path_factory.mktemp("zoo5")
    base = make_base(root / "base")
    for i in range(5):
        make_expert(base, root / f"e{i}", seed=40 + i)
    return root
