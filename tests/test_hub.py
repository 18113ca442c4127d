"""Hub ids resolve offline from a pre-populated Hugging Face cache; a missing one fails early."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors import safe_open

from mergecli import load_recipe, plan_merge
from mergecli.errors import HubError, RecipeError
from mergecli.sources.hub import DownloadingCheckpoint, parse_hub_id
from tests.helpers import load_state, run_cli, write_recipe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo: str, folder: Path, commit: str = COMMIT) -> None:
    """Lay out ``folder`` as huggingface_hub stores a download: blobs, snapshot links, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for i, file in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        blob = root / "blobs" / f"{commit[:8]}{i:04d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # tests never reach the network
    return cache


def test_hub_ids_resolve_offline_from_cache(zoo: Path, hub_cache: Path, tmp_path: Path) -> None:
    for name in ("base", "math", "code"):
        cache_model(hub_cache, f"tiny-org/{name}", zoo / name)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "tiny-org/base",
        "models": [
            {"model": f"tiny-org/math@{COMMIT}", "parameters": {"weight": 0.5}},
            {"model": "tiny-org/code", "revision": "main"},
        ],
        "output": str(tmp_path / "hub"),
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe, "hub.yaml"), "--quiet")
    assert result.exit_code == 0, result.output
    local = {
        **recipe,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "math"), "parameters": {"weight": 0.5}},
            {"model": str(zoo / "code")},
        ],
        "output": str(tmp_path / "local"),
    }
    assert run_cli("merge", write_recipe(tmp_path, local, "local.yaml"), "--quiet").exit_code == 0
    got, want = load_state(tmp_path / "hub"), load_state(tmp_path / "local")
    assert got.keys() == want.keys()
    assert all((got[k] == want[k]).all() for k in want)


def test_hub_adapter_names_its_hub_base(
    zoo: Path,
    adapters: dict[str, Path],
    hub_cache: Path,
    tmp_path: Path,
) -> None:
    cache_model(hub_cache, "tiny-org/base", zoo / "base")
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["lora8"], adapter)
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace(str(zoo / "base"), "tiny-org/base"))
    cache_model(hub_cache, "tiny-org/lora", adapter)
    recipe = {"merge_method": "task_arithmetic", "models": [{"model": "tiny-org/lora"}]}
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    got, want = load_state(tmp_path / "out"), load_state(adapters["lora8_full"])
    assert all((got[k] - want[k]).abs().max() <= 1e-6 for k in want)
    inspected = run_cli("inspect", "tiny-org/lora", "--json")
    assert inspected.exit_code == 0, inspected.output
    assert '"base": "tiny-org/base"' in inspected.output


def test_missing_hub_id_fails_before_merging(zoo: Path, hub_cache: Path, tmp_path: Path) -> None:
    cache_model(hub_cache, "tiny-org/base", zoo / "base")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "tiny-org/base",
        "models": [{"model": str(zoo / "math")}, {"model": "tiny-org/nowhere@v2"}],
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: models[1].model: 'tiny-org/nowhere@v2' is not a local folder and is not in the "
        "Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE is set or there is no "
        "network)"
    ]
    assert not (tmp_path / "out").exists()
    with pytest.raises(HubError) as caught:
        plan_merge(load_recipe(write_recipe(tmp_path, recipe)))
    assert caught.value.repo_id == "tiny-org/nowhere"
    with pytest.raises(RecipeError) as caught:
        parse_hub_id("tiny-org/base@v1", "v2")
    assert caught.value.key == "revision"


def test_shards_merge_while_the_rest_download(
    zoo: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the small files are cached; the Hub (faked) sends the shards one by one, the last
    one only once the merge has asked for a tensor."""
    base = zoo / "base"
    small = tmp_path / "small"
    shutil.copytree(base, small, ignore=shutil.ignore_patterns("*.safetensors"))
    cache_model(hub_cache, "tiny-org/base", small)
    snapshot = hub_cache / "models--tiny-org--base" / "snapshots" / COMMIT
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) > 2
    reading, downloaded = threading.Event(), []

    def download(repo: str, filename: str, revision: str) -> str:
        assert (repo, revision) == ("tiny-org/base", COMMIT)
        if filename == shards[-1].name:
            assert reading.wait(30), "no tensor was read before the last shard arrived"
        shutil.copyfile(base / filename, snapshot / filename)
        downloaded.append(filename)
        return str(snapshot / filename)

    def metadata(repo: str, revision: str) -> SimpleNamespace:
        files = {}
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                files[shard.name] = SimpleNamespace(
                    tensors={
                        k: SimpleNamespace(
                            dtype=f.get_slice(k).get_dtype(), shape=f.get_slice(k).get_shape()
                        )
                        for k in f.keys()  # noqa: SIM118
                    }
                )
        return SimpleNamespace(files_metadata=files)

    local = DownloadingCheckpoint._local

    def wait(self: DownloadingCheckpoint, file: Path) -> Path:
        reading.set()
        return local(self, file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(DownloadingCheckpoint, "_local", wait)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "tiny-org/base",
        "models": [{"model": str(zoo / "math")}, {"model": str(zoo / "code")}],
    }
    path = write_recipe(tmp_path, recipe)
    assert run_cli("merge", path, "--dry-run", "--json").exit_code == 0
    assert downloaded == []  # planning reads the Hub's headers only
    result = run_cli("merge", path, "-o", tmp_path / "hub", "--quiet")
    assert result.exit_code == 0, result.output
    assert downloaded == [s.name for s in shards]
    local = {**recipe, "base_model": str(base)}
    path = write_recipe(tmp_path, local, "local.yaml")
    assert run_cli("merge", path, "-o", tmp_path / "local", "--quiet").exit_code == 0
    got, want = load_state(tmp_path / "hub"), load_state(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_uncached_shards_offline_fail_before_merging(
    zoo: Path, hub_cache: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    shutil.copytree(zoo / "base", small, ignore=shutil.ignore_patterns("*.safetensors"))
    cache_model(hub_cache, "tiny-org/base", small)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "tiny-org/base",
        "models": [{"model": str(zoo / "math")}],
    }
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "'tiny-org/base' (weights) is not in the Hugging Face cache" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(HubError) as caught:
        plan_merge(load_recipe(write_recipe(tmp_path, recipe)))
    assert caught.value.repo_id == "tiny-org/base"
