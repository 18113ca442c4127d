"""Engine behaviour: shards, determinism, plans, parameter schedules, reports, model card."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mergecli
from mergecli.layers import layer_position
from mergecli.sources import Checkpoint
from tests.conftest import EXPERTS
from tests.helpers import load_state, read_json, run_cli, write_recipe


def ta_recipe(zoo: Path, out: Path, **extra: object) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in EXPERTS],
        "parameters": {"lambda": 0.5},
        "output": str(out),
        **extra,
    }


def test_shards_respect_the_size_limit_and_index(zoo: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, ta_recipe(zoo, tmp_path / "out"))
    assert run_cli("merge", path, "--shard-size", "20KB", "--quiet").exit_code == 0
    out = tmp_path / "out"
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    state = load_state(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard.name]
        data = sum(state[n].nbytes for n in names)
        assert data <= 20_000 or len(names) == 1
    assert set(state) == set(load_state(zoo / "base"))


def test_same_recipe_and_seed_give_byte_identical_output(zoo: Path, tmp_path: Path) -> None:
    digests = []
    for i in range(2):
        recipe = ta_recipe(zoo, tmp_path / f"out{i}", merge_method="dare_ties", seed=11)
        recipe["parameters"] = {"density": 0.4}
        assert (
            run_cli(
                "merge",
                write_recipe(tmp_path, recipe, f"r{i}.yaml"),
                "--quiet",
                "--shard-size",
                "30KB",
            ).exit_code
            == 0
        )
        digests.append(
            {p.name: p.read_bytes() for p in (tmp_path / f"out{i}").glob("*.safetensors")}
        )
    assert digests[0] == digests[1]


def test_dry_run_reads_no_tensor_and_prints_the_plan(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reads(self, name):
        raise AssertionError(f"dry run read {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    path = write_recipe(tmp_path, ta_recipe(zoo, tmp_path / "out"))
    result = run_cli("merge", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    base_bytes = sum(t.nbytes for t in load_state(zoo / "base").values())
    assert plan["tensors"] == len(load_state(zoo / "base"))
    assert plan["bytes_to_read"] == 4 * base_bytes
    assert plan["bytes_to_write"] == base_bytes
    assert plan["passes"] == 1
    assert not (tmp_path / "out").exists()
    text = run_cli("merge", path, "--dry-run")
    assert "bytes to read" in text.output and "peak memory estimate" in text.output


def test_model_scope_ties_plans_statistics_passes(zoo: Path, tmp_path: Path) -> None:
    recipe = ta_recipe(zoo, tmp_path / "out", merge_method="ties")
    plan = mergecli.plan_merge(mergecli.recipe.recipe_from_dict(recipe))
    assert plan.passes == 3
    recipe["parameters"] = {"scope": "tensor"}
    assert mergecli.plan_merge(mergecli.recipe.recipe_from_dict(recipe)).passes == 1


def test_gradient_and_filtered_parameters(zoo: Path, tmp_path: Path) -> None:
    gradient = [0.0, 1.0, 0.5]
    recipe = ta_recipe(zoo, tmp_path / "out")
    recipe["parameters"] = {"lambda": [{"filter": "mlp", "value": gradient}, {"value": 0.25}]}
    recipe["models"][1]["parameters"] = {"weight": [{"filter": "self_attn", "value": 2.0}]}
    assert run_cli("merge", write_recipe(tmp_path, recipe), "--quiet").exit_code == 0
    got, base = load_state(tmp_path / "out"), load_state(zoo / "base")
    experts = [load_state(zoo / n) for n in EXPERTS]
    for name, b in base.items():
        pos = layer_position(name, 3)
        lam = float(np.interp(pos, [0, 0.5, 1], gradient)) if "mlp" in name else 0.25
        w = [1.0, 2.0 if "self_attn" in name else 1.0, 1.0]
        want = b + lam * sum(wt * (e[name] - b) for wt, e in zip(w, experts, strict=True))
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)


def test_layer_positions() -> None:
    assert layer_position("model.embed_tokens.weight", 4) == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert layer_position("lm_head.weight", 4) == 1.0
    assert layer_position("model.norm.weight", 4) == 1.0


def test_out_dtype_and_config(zoo: Path, tmp_path: Path) -> None:
    recipe = ta_recipe(zoo, tmp_path / "out", out_dtype="bfloat16", dtype="float64")
    assert run_cli("merge", write_recipe(tmp_path, recipe), "--quiet").exit_code == 0
    got = load_state(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    config = read_json(tmp_path / "out" / "config.json")
    assert "bfloat16" in {config.get("dtype"), config.get("torch_dtype")}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_report_and_model_card(zoo: Path, tmp_path: Path) -> None:
    recipe = ta_recipe(zoo, tmp_path / "out", merge_method="ties")
    recipe["parameters"] = {"density": 0.3, "scope": "tensor"}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--json")
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    report = read_json(tmp_path / "out" / "merge_report.json")
    assert summary["totals"] == report["totals"]
    assert [i["role"] for i in report["inputs"]] == ["base", *EXPERTS]
    assert all(len(i["fingerprint"]) == 16 and i["bytes"] > 0 for i in report["inputs"])
    assert report["recipe"]["merge_method"] == "ties"
    assert set(report["run"]["timing"]) == {"wall_s", "read_s", "compute_s", "write_s"}
    # the in-process merge reports this process's peak resident memory, taken during the run
    assert peak_before <= report["run"]["peak_rss_bytes"] <= peak_after
    assert report["bytes_written"] == sum(
        p.stat().st_size for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"
    )
    name = "model.layers.0.mlp.gate_proj.weight"
    row = report["tensors"][name]
    base, expert = load_state(zoo / "base")[name], load_state(zoo / "math")[name]
    merged = load_state(tmp_path / "out")[name]
    tv, delta = (expert - base).double(), (merged - base).double()
    assert row["task_vector_norm"][0] == pytest.approx(tv.norm().item(), rel=1e-9)
    cos = (tv * delta).sum() / (tv.norm() * delta.norm())
    assert row["cosine_to_delta"][0] == pytest.approx(cos.item(), rel=1e-6)
    assert 0.2 < row["kept"][0] <= 0.3 + 1e-9
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(zoo / "base")
    assert meta["tags"] == ["merge", "mergecli"]
    assert "merge_method: ties" in card
    assert "# Merge report" in (tmp_path / "out" / "merge_report.md").read_text()


def test_library_api_without_cli(zoo: Path, tmp_path: Path) -> None:
    recipe = mergecli.recipe.recipe_from_dict(ta_recipe(zoo, tmp_path / "unused"))
    plan = mergecli.plan_merge(recipe, shard_size="1MB")
    result = mergecli.run_merge(plan, tmp_path / "api")
    assert result.output == (tmp_path / "api").resolve()
    assert (tmp_path / "api" / "model.safetensors").is_file()
    assert result.report["method"] == "task_arithmetic"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(zoo: Path, tmp_path: Path) -> None:
    for device in ("cpu", "cuda"):
        recipe = ta_recipe(zoo, tmp_path / device, merge_method="ties")
        assert (
            run_cli(
                "merge",
                write_recipe(tmp_path, recipe, f"{device}.yaml"),
                "--quiet",
                "--device",
                device,
            ).exit_code
            == 0
        )
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for name in cpu:
        torch.testing.assert_close(cpu[name], gpu[name], atol=1e-6, rtol=0)
