"""EMR and TALL-mask artifacts: written by `merge`, rebuilt per task by `export` and the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import mergecli
from mergecli.artifacts import open_artifact, task_state_dict
from mergecli.engine.task_artifact import pack_mask, unpack_mask
from mergecli.recipe import recipe_from_dict
from tests import dense
from tests.conftest import EXPERTS
from tests.helpers import load_state, read_json, run_cli, write_recipe

TASKS = ("algebra", "python", "dialogue")
LAMBDAS = (0.4, 0.6, 0.5)


def artifact_recipe(zoo: Path, out: Path, method: str, **params: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / n), "name": task, "parameters": {"lambda": lam}}
            if method == "tall_masks"
            else {"model": str(zoo / n), "name": task}
            for n, task, lam in zip(EXPERTS, TASKS, LAMBDAS, strict=True)
        ],
        "parameters": params,
        "output": str(out),
    }


def dense_tasks(zoo: Path, method: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every task's reconstruction θ0 + ξt (mt ⊙ τuni), whole tensors in float32."""
    base, experts = dense.load_inputs(zoo)
    scales = dense.emr_rescalers(base, experts) if method == "emr" else [1.0] * 3
    tasks: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TASKS}
    for name, b in base.items():
        tvs = dense.task_vectors(base, experts, name)
        if method == "emr":
            unified, masks = dense.emr_parts(tvs)
        else:
            unified = sum(tvs)
            masks = dense.tall_masks(tvs, unified, list(LAMBDAS))
        for t, task in enumerate(TASKS):
            tasks[task][name] = b + scales[t] * (unified * masks[t])
    return tasks


@pytest.fixture(scope="module", params=["emr", "tall_masks"])
def artifact(request: pytest.FixtureRequest, zoo: Path, tmp_path_factory: pytest.TempPathFactory):
    """(method, artifact folder, CLI JSON summary) of a merge with small shards."""
    tmp = tmp_path_factory.mktemp(request.param)
    path = write_recipe(tmp, artifact_recipe(zoo, tmp / "artifact", request.param))
    result = run_cli("merge", path, "--json", "--shard-size", "30KB")
    assert result.exit_code == 0, result.output
    return request.param, tmp / "artifact", json.loads(result.stdout)


def test_export_of_each_task_equals_the_dense_reconstruction(artifact, zoo: Path, tmp_path: Path):
    method, folder, _ = artifact
    want = dense_tasks(zoo, method)
    for task in TASKS:
        result = run_cli("export", folder, "--task", task, "--output", tmp_path / task, "--quiet")
        assert result.exit_code == 0, result.output
        got = load_state(tmp_path / task)
        assert set(got) == set(want[task])
        for name, tensor in want[task].items():
            torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=f"{task} {name}")


def test_api_rebuilds_a_task_in_memory(artifact, zoo: Path) -> None:
    method, folder, _ = artifact
    state = task_state_dict(open_artifact(folder), "python")
    for name, tensor in dense_tasks(zoo, method)["python"].items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_exported_task_loads_and_gives_the_expected_logits(artifact, zoo: Path, tmp_path: Path):
    method, folder, _ = artifact
    assert run_cli("export", folder, "--task", "algebra", "-o", tmp_path / "m", "-q").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    reference = LlamaForCausalLM(model.config)
    reference.load_state_dict(dense_tasks(zoo, method)["algebra"])
    ids = torch.tensor([[1, 4, 8, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_size_on_disk_is_reported_in_models(artifact, zoo: Path) -> None:
    method, folder, summary = artifact
    info = summary["artifact"]
    assert info["tasks"] == list(TASKS) and info["method"] == method
    files = list(folder.rglob("*.safetensors"))
    assert info["bytes"] == sum(f.stat().st_size for f in files)
    model_files = sum(f.stat().st_size for f in (zoo / "base").glob("*.safetensors"))
    numel = sum(t.numel() for t in load_state(zoo / "base").values())
    # base + unified in float32 + one bit per entry and task; headers make the rest
    data = 2 * 4 * numel + 3 * sum((t.numel() + 7) // 8 for t in load_state(zoo / "base").values())
    assert data / (4 * numel) == pytest.approx(2 + 3 / 32, abs=1e-3)
    assert info["size_in_models"] == pytest.approx(info["bytes"] / info["model_bytes"])
    assert info["model_bytes"] == pytest.approx(model_files, rel=0.05)
    assert abs(info["size_in_models"] - data / (4 * numel)) < 0.1
    report = read_json(folder / "merge_report.json")
    assert report["artifact"] == info
    assert "Task-mask artifact" in (folder / "merge_report.md").read_text()
    manifest = read_json(folder / "artifact.json")
    assert manifest["tasks"] == list(TASKS)


def test_emr_rescalers_are_whole_model_statistics(zoo: Path, tmp_path: Path) -> None:
    plan = mergecli.plan_merge(recipe_from_dict(artifact_recipe(zoo, tmp_path / "a", "emr")))
    assert plan.passes == 2 and plan.summary()["output"] == "task_masks"
    mergecli.run_merge(plan, tmp_path / "a")
    scales = read_json(tmp_path / "a" / "artifact.json")["scales"]
    base, experts = dense.load_inputs(zoo)
    want = dense.emr_rescalers(base, experts)
    assert set(scales) == set(base)
    for values in scales.values():
        assert values == pytest.approx(want, rel=1e-9)


def test_bfloat16_artifact_is_about_two_plus_m_over_16_models(zoo_bf16: Path, tmp_path: Path):
    recipe = artifact_recipe(zoo_bf16, tmp_path / "a", "emr")
    dry = run_cli("merge", write_recipe(tmp_path, recipe), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)["artifact_size_in_models"]
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--json")
    size = json.loads(result.stdout)["artifact"]["size_in_models"]
    assert size == pytest.approx(planned)
    assert 2 + 3 / 16 <= size < 2 + 3 / 16 + 0.15  # tiny tensors: headers are a few percent
    state = task_state_dict(open_artifact(tmp_path / "a"), "dialogue")
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def test_task_names_default_to_folders_and_are_made_unique(zoo: Path, tmp_path: Path) -> None:
    recipe = artifact_recipe(zoo, tmp_path / "a", "tall_masks")
    for m in recipe["models"]:
        del m["name"]
    plan = mergecli.plan_merge(recipe_from_dict(recipe))
    assert plan.summary()["artifact_tasks"] == list(EXPERTS)
    recipe["models"][2]["name"] = "math"
    recipe["models"][0]["name"] = "math"
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--json")
    assert result.exit_code == 0, result.output
    assert "models[2].name 'math' is also the name of models[0]: it is called 'math#2'" in (
        result.stderr
    )
    assert json.loads(result.stdout)["artifact"]["tasks"] == ["math", "code", "math#2"]


def test_unknown_task_suggests_a_name(artifact, tmp_path: Path) -> None:
    _, folder, _ = artifact
    result = run_cli("export", folder, "--task", "pyton", "--output", tmp_path / "x")
    assert result.exit_code == 2
    assert "did you mean 'python'" in result.output
    assert not (tmp_path / "x").exists()


def test_masks_pack_eight_entries_per_byte() -> None:
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (65 + 7) // 8
    assert torch.equal(unpack_mask(packed, (5, 13)), mask)
    assert int(pack_mask(torch.tensor([True] + [False] * 7))[0]) == 1  # little-endian bits
