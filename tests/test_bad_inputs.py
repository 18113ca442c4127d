"""Every bad input: one clear line naming the key/file/tensor, non-zero exit, no traceback, no
output left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergecli import load_recipe, plan_merge, run_merge
from mergecli.errors import (
    MergeError,
    OutputError,
    RecipeError,
    ShapeError,
    SourceError,
    UnknownMethodError,
    UnknownParameterError,
)
from mergecli.sources import Checkpoint
from tests.conftest import EXPERTS
from tests.helpers import load_state, run_cli, write_recipe


def base_recipe(zoo: Path, out: Path, **changes: object) -> dict:
    recipe: dict = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n), "parameters": {"density": 0.5}} for n in EXPERTS],
        "parameters": {"lambda": 1.0},
        "output": str(out),
    }
    recipe.update(changes)
    return recipe


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensor(folder: Path, name: str, value: torch.Tensor | None) -> None:
    """Replace (or drop, when value is None) one tensor in whichever shard holds it."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    state = load_state_file(shard)
    if value is None:
        del state[name]
        del index["weight_map"][name]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        state[name] = value
    save_file(state, shard, metadata={"format": "pt"})


def load_state_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(file))


def library_error(path: Path) -> MergeError:
    """The error that loading and planning the recipe raises from Python."""
    with pytest.raises(MergeError) as caught:
        plan_merge(load_recipe(path))
    return caught.value


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 2
    text = result.output
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in text, text
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if "mergecli-tmp" in p.name]
    assert not leftovers


CASES = {
    "unknown key": (
        {"merge_methd": "ties"},
        ["merge_methd", "did you mean 'merge_method'"],
        (RecipeError, "key", "merge_methd"),
    ),
    "unknown method": (
        {"merge_method": "tise"},
        ["tise", "did you mean 'ties'"],
        (UnknownMethodError, "method", "tise"),
    ),
    "unknown parameter": (
        {"parameters": {"lamda": 1.0}},
        ["lamda", "did you mean 'lambda'"],
        (UnknownParameterError, "key", "parameters.lamda"),
    ),
    "bad choice": (
        {"parameters": {"scope": "modle"}},
        ["scope", "did you mean 'model'"],
        (RecipeError, "key", "parameters.scope"),
    ),
    "bad value type": (
        {"parameters": {"lambda": "big"}},
        ["parameters.lambda", "number"],
        (RecipeError, "key", "parameters.lambda"),
    ),
    "global param per model": (
        {"models": [{"model": "x", "parameters": {"lambda": 1}}]},
        ["models[0].parameters.lambda", "whole merge"],
        (RecipeError, "key", "models[0].parameters.lambda"),
    ),
    "missing path": (
        {"base_model": "does/not/exist"},
        ["base_model", "does/not/exist", "does not exist"],
        (SourceError, "path", "DIR/does/not/exist"),
    ),
    "bad dtype": (
        {"dtype": "flaot16"},
        ["dtype", "did you mean 'float16'"],
        (RecipeError, "key", "dtype"),
    ),
    "missing models": ({"models": None}, ["models"], (RecipeError, "key", "models")),
    "needs base": (
        {"base_model": None},
        ["base_model", "needs a base model"],
        (RecipeError, "key", "base_model"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_errors(zoo: Path, tmp_path: Path, case: str) -> None:
    changes, needles, (kind, field, value) = CASES[case]
    recipe = base_recipe(zoo, tmp_path / "out", **changes)
    if recipe["models"] is None:
        del recipe["models"]
    if case == "global param per model":
        recipe["models"][0]["model"] = str(zoo / "math")
    if "merge_methd" in changes:
        del recipe["merge_method"]
    path = write_recipe(tmp_path, recipe)
    assert_clean_failure(run_cli("merge", path), tmp_path / "out", *needles)
    error = library_error(path)
    assert type(error) is kind
    expected = Path(value.replace("DIR", str(tmp_path))) if field == "path" else value
    assert getattr(error, field) == expected


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: ties\nmodels: [\n")
    assert_clean_failure(run_cli("merge", path), tmp_path / "out", "invalid YAML", "line")
    error = library_error(path)
    assert type(error) is RecipeError and error.key is None


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = run_cli("merge", tmp_path / "nope.yaml")
    assert_clean_failure(result, tmp_path / "out", "nope.yaml", "does not exist")
    error = library_error(tmp_path / "nope.yaml")
    assert type(error) is SourceError and error.path == tmp_path / "nope.yaml"


def test_architecture_mismatch(zoo: Path, tmp_path: Path) -> None:
    other = copy_model(zoo / "code", tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mistral"
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    recipe = base_recipe(zoo, tmp_path / "out")
    recipe["models"][1]["model"] = str(other)
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert_clean_failure(result, tmp_path / "out", "models[1].model", "mistral", "config.json")
    error = library_error(write_recipe(tmp_path, recipe))
    assert type(error) is SourceError and error.path == other / "config.json"


def test_tensor_missing_from_expert(zoo: Path, tmp_path: Path) -> None:
    other = copy_model(zoo / "code", tmp_path / "other")
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensor(other, name, None)
    recipe = base_recipe(zoo, tmp_path / "out")
    recipe["models"][2]["model"] = str(other)
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert_clean_failure(result, tmp_path / "out", "models[2].model", name, "missing", "on_missing")
    error = library_error(write_recipe(tmp_path, recipe))
    assert type(error) is ShapeError and error.tensor == name
    recipe["on_missing"] = "base"
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--quiet")
    assert result.exit_code == 0, result.output
    assert "kept from the base" in result.output
    merged, base = load_state(tmp_path / "out"), load_state(zoo / "base")
    assert torch.equal(merged[name], base[name])


def test_shape_mismatch(zoo: Path, tmp_path: Path) -> None:
    other = copy_model(zoo / "code", tmp_path / "other")
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_tensor(other, name, torch.zeros(8, 8))
    recipe = base_recipe(zoo, tmp_path / "out")
    recipe["models"][0]["model"] = str(other)
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert_clean_failure(result, tmp_path / "out", "models[0].model", name, "[8, 8]", "[32, 32]")
    error = library_error(write_recipe(tmp_path, recipe))
    assert type(error) is ShapeError and error.tensor == name


def test_non_floating_tensor_dtype_family(zoo: Path, tmp_path: Path) -> None:
    other = copy_model(zoo / "code", tmp_path / "other")
    name = "model.norm.weight"
    rewrite_tensor(other, name, torch.ones(32, dtype=torch.int64))
    recipe = base_recipe(zoo, tmp_path / "out")
    recipe["models"][1]["model"] = str(other)
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert_clean_failure(result, tmp_path / "out", "models[1].model", name, "torch.int64")
    error = library_error(write_recipe(tmp_path, recipe))
    assert type(error) is ShapeError and error.tensor == name


def test_differing_integer_buffers_warn_and_keep_base(zoo: Path, tmp_path: Path) -> None:
    name = "model.position_ids"
    models = {}
    for n, value in (("base", 0), ("math", 0), ("code", 1), ("chat", 0)):
        models[n] = copy_model(zoo / n, tmp_path / n)
        rewrite_tensor(models[n], "model.norm.weight", load_state(zoo / n)["model.norm.weight"])
        index_file = models[n] / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        shard = models[n] / next(iter(index["weight_map"].values()))
        state = load_state_file(shard)
        state[name] = torch.arange(8) + value
        save_file(state, shard, metadata={"format": "pt"})
        index["weight_map"][name] = shard.name
        index_file.write_text(json.dumps(index))
    recipe = base_recipe(tmp_path, tmp_path / "out")
    result = run_cli("merge", write_recipe(tmp_path, recipe), "--quiet")
    assert result.exit_code == 0, result.output
    assert name in result.output and "models[1].model" in result.output
    merged = load_state(tmp_path / "out")
    assert torch.equal(merged[name], torch.arange(8))


def test_existing_output_needs_force(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    path = write_recipe(tmp_path, base_recipe(zoo, out))
    result = run_cli("merge", path)
    assert result.exit_code == 2 and "--force" in result.output
    with pytest.raises(OutputError) as caught:
        run_merge(plan_merge(load_recipe(path)), out)
    assert caught.value.path == out
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("merge", path, "--force", "--quiet").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_mid_merge_leaves_nothing(zoo: Path, tmp_path: Path, monkeypatch) -> None:
    from mergecli.engine import writer

    calls = {"n": 0}
    original = writer.ShardWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        original(self, name, tensor)

    monkeypatch.setattr(writer.ShardWriter, "write", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    path = write_recipe(tmp_path, base_recipe(zoo, out))
    result = run_cli("merge", path, "--force")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "disk full" in result.output
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert not [p for p in tmp_path.iterdir() if "mergecli-tmp" in p.name]


def test_bin_weights_refused_unless_opted_in(zoo: Path, tmp_path: Path) -> None:
    other = tmp_path / "binmodel"
    other.mkdir()
    shutil.copy(zoo / "code" / "config.json", other)
    torch.save(load_state(zoo / "code"), other / "pytorch_model.bin")
    recipe = base_recipe(zoo, tmp_path / "out")
    recipe["models"][1]["model"] = str(other)
    path = write_recipe(tmp_path, recipe)
    assert_clean_failure(run_cli("merge", path), tmp_path / "out", "models[1].model", "allow_bin")
    error = library_error(path)
    assert type(error) is SourceError and error.path == other
    result = run_cli("merge", path, "--allow-bin", "--quiet")
    assert result.exit_code == 0, result.output
    # methods modify what they read in place (τ = θ − θ0): a .bin read must be a copy, so that
    # statistics passes and the merge all read the stored weights
    source = Checkpoint(other, "models[1].model", allow_bin=True)
    name = source.tensor_names()[0]
    source.read(name).zero_()
    assert torch.equal(source.read(name), load_state(zoo / "code")[name])


def test_plan_merge_refuses_to_average_a_greedy_soup(zoo: Path, tmp_path: Path) -> None:
    """From Python, a selecting method is not silently merged over every listed expert."""
    recipe = base_recipe(zoo, tmp_path / "out", merge_method="greedy_soup", parameters={})
    for model in recipe["models"]:
        model["parameters"] = {}
    path = write_recipe(tmp_path, recipe)
    error = library_error(path)
    assert type(error) is RecipeError and error.key == "merge_method"
    assert "plan_with_selection" in str(error)
    plan = plan_merge(load_recipe(path), experts_selected=True)
    assert len(plan.experts) == len(EXPERTS)
