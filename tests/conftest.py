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

from scripts.fixtures import make_base, make_expert  # noqa: E402
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
