"""Streaming mechanics: elementwise methods merged in row chunks give the whole tensor's result
bit for bit, the writer assembles chunks, memory does not grow with the largest tensor, and
compute threads follow the cores the process may use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergecli
import mergecli.engine.plan as plan_module
import mergecli.methods.ties as ties_module
from mergecli.engine import threads
from mergecli.engine.layout import plan_shards
from mergecli.engine.writer import ShardWriter
from mergecli.recipe import recipe_from_dict
from mergecli.sources import Checkpoint
from tests import dense
from tests.conftest import EXPERTS
from tests.helpers import load_state, read_json
from tests.test_statistics_memory import start_measured_merge

CASES = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"lambda": 0.7},
    "dare_linear": {"density": 0.6},
    "ties": {"density": 0.3, "scope": "model"},
    "dare_ties": {"density": 0.5},
}


def merge(zoo: Path, out: Path, method: str, chunk: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", chunk)
    recipe = recipe_from_dict(
        {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n)} for n in EXPERTS],
            "parameters": CASES[method],
            "seed": 3,
        }
    )
    plan = mergecli.plan_merge(recipe)
    mergecli.run_merge(plan, out)
    return plan


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m == "ties" else m for m in CASES]
)
def test_chunked_merge_equals_whole_tensor_merge(
    zoo_bf16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    chunked = merge(zoo_bf16, tmp_path / "chunked", method, 97, monkeypatch)
    assert max(len(chunked.pieces(t)) for t in chunked.tensors) > 10  # really chunked
    whole = merge(zoo_bf16, tmp_path / "whole", method, 1 << 30, monkeypatch)
    assert all(whole.pieces(t) == [None] for t in whole.tensors)
    got, want = load_state(tmp_path / "chunked"), load_state(tmp_path / "whole")
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name].view(torch.uint8), value.view(torch.uint8)), name
    rows = read_json(tmp_path / "chunked" / "merge_report.json")["tensors"]
    expected = read_json(tmp_path / "whole" / "merge_report.json")["tensors"]
    for name, row in expected.items():
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            got_values = rows[name][key] if isinstance(value, list) else [rows[name][key]]
            for a, b in zip(got_values, values, strict=True):
                assert a == (b if b is None else pytest.approx(b, rel=1e-9, abs=1e-12)), name


def test_ties_in_row_blocks_equals_whole_tensor_ties(
    zoo_bf16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensor scope merges whole tensors, in row blocks once the thresholds are known."""
    outputs = {}
    for block in (50, 1 << 30):
        monkeypatch.setattr(ties_module, "BLOCK_ELEMENTS", block)
        recipe = recipe_from_dict(
            {
                "merge_method": "ties",
                "base_model": str(zoo_bf16 / "base"),
                "models": [{"model": str(zoo_bf16 / n)} for n in EXPERTS],
                "parameters": {"density": 0.3, "scope": "tensor"},
            }
        )
        mergecli.run_merge(mergecli.plan_merge(recipe), tmp_path / str(block))
        outputs[block] = tmp_path / str(block)
    got, want = (load_state(path) for path in outputs.values())
    for name, value in want.items():
        assert torch.equal(got[name].view(torch.uint8), value.view(torch.uint8)), name
    reports = [read_json(path / "merge_report.json")["tensors"] for path in outputs.values()]
    assert reports[0] == reports[1]


@pytest.mark.slow
def test_tensor_scope_ties_streams_in_chunks_and_equals_the_formula(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensor scope streams its large tensors in row chunks, each tensor's thresholds from the
    statistics passes over its chunks, and writes the whole-tensor TIES of the dense formula."""
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 97)
    recipe = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n)} for n in EXPERTS],
            "parameters": {"density": 0.3, "scope": "tensor"},
        }
    )
    plan = mergecli.plan_merge(recipe)
    streamed = [t for t in plan.tensors if t.merge and len(plan.pieces(t)) > 1]
    assert len(streamed) > 5 and plan.passes == 3
    (statistic,) = plan.statistics
    assert statistic.tensors == {t.name for t in streamed}  # whole tensors need no pass
    mergecli.run_merge(plan, tmp_path / "out")
    base, experts = dense.load_inputs(zoo)
    got = load_state(tmp_path / "out")
    for t in plan.tensors:
        if not t.merge:
            continue
        tvs = dense.task_vectors(base, experts, t.name)
        trimmed = [tv * (tv.abs() >= dense.top_k(tv, 0.3)) for tv in tvs]
        want = base[t.name] + dense.ties_vector(trimmed, [1.0] * len(tvs))
        torch.testing.assert_close(got[t.name].float(), want, rtol=0, atol=1e-6, msg=t.name)


def test_checkpoint_reads_rows_into_private_memory(tmp_path: Path) -> None:
    value = torch.arange(60, dtype=torch.float32).reshape(12, 5).to(torch.bfloat16)
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(3), "w": value}, tmp_path / "m" / "model.safetensors")
    ckpt = Checkpoint(tmp_path / "m", "m")
    assert torch.equal(ckpt.read("w"), value)
    rows = ckpt.read("w", (4, 9))
    assert torch.equal(rows, value[4:9])
    rows.add_(1)  # private: the file and later reads are unchanged
    assert torch.equal(ckpt.read("w", (4, 9)), value[4:9])


def test_writer_assembles_row_chunks_and_refuses_wrong_ones(tmp_path: Path) -> None:
    value = torch.randn(7, 3)
    shards = plan_shards([("a", (7, 3), torch.float32), ("b", (2,), torch.float32)], 1 << 20)
    writer = ShardWriter(tmp_path, shards)
    for start in range(0, 7, 3):
        writer.write("a", value[start : start + 3])
    with pytest.raises(RuntimeError, match="layout says"):
        writer.write("b", torch.zeros(3))
    writer.write("b", torch.zeros(2))
    writer.finish()
    assert torch.equal(load_state(tmp_path)["a"], value)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_peak_memory_does_not_grow_with_the_largest_tensor(tmp_path: Path, scope: str) -> None:
    """Either scope of TIES streams a tensor far larger than a row chunk: the statistics passes
    and the merge hold a chunk at a time, never the whole tensor."""
    rows, cols = 4096, 2048  # 32 MB in float32: one tensor, merged in 256 KB chunks
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen)
    for t in range(4):
        folder = tmp_path / f"m{t}"
        folder.mkdir()
        noise = 0.01 * torch.randn(rows, cols, generator=gen) if t else 0.0
        save_file({"model.embed_tokens.weight": base + noise}, folder / "model.safetensors")
    tensor_bytes = base.nbytes
    del base
    recipe = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "m0"),
        "models": [{"model": str(tmp_path / f"m{t}")} for t in (1, 2, 3)],
        "parameters": {"density": 0.3, "scope": scope},
    }
    setup = "import mergecli.engine.plan as p; p.CHUNK_ELEMENTS = 1 << 16\n"
    run = start_measured_merge(recipe, tmp_path / "out", setup)
    stdout, _ = run.communicate()
    assert run.returncode == 0
    # the whole-tensor path holds four float32 copies and more; chunks stay under one
    assert int(stdout.split()[-1]) < tensor_bytes, stdout
    name = "model.embed_tokens.weight"
    base_value, *expert_values = (load_state(tmp_path / f"m{t}")[name] for t in range(4))
    tvs = [e - base_value for e in expert_values]
    # one tensor: both scopes take each expert's threshold over it
    trimmed = [tv * (tv.abs() >= dense.top_k(tv, 0.3)) for tv in tvs]
    want = base_value + dense.ties_vector(trimmed, [1.0] * 3)
    got = load_state(tmp_path / "out")[name]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_compute_threads_follow_the_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    quota.write_text("max 100000\n")
    assert threads.available_cores() == 8
    quota.write_text("150000 100000\n")
    assert threads.available_cores() == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with threads.compute_threads() as n:
        assert n == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before
