"""FlexMerge: exact ends of the size range, size accounting, the greedy order against a brute
force, serving with shared tensors, Channel Merging and the command line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import mergecli
from mergecli.artifacts import open_artifact
from mergecli.artifacts.export import export_task
from mergecli.blocks import block_of
from mergecli.flex import plan_flex, run_flex
from mergecli.flex.order import merge_order
from mergecli.flex.serve import task_models, task_state_dicts
from mergecli.methods import TensorInputs
from mergecli.recipe import recipe_from_dict
from tests import dense
from tests.helpers import load_state, read_json, run_cli, write_recipe

TASKS = [f"e{i}" for i in range(5)]


def recipe(zoo: Path, method: str = "task_arithmetic", **extra: Any) -> dict[str, Any]:
    params = {"normalize": True} if method == "task_arithmetic" else {}
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / t)} for t in TASKS],
        "parameters": params,
        **extra,
    }


def flex(zoo: Path, out: Path, sizes: list[float], method: str = "task_arithmetic", **opts: Any):
    spec = recipe_from_dict(recipe(zoo, method))
    return run_flex(plan_flex(spec, {"sizes": sizes, **opts}), out, force=True)


def exported(artifact: Path, task: str, out: Path) -> dict[str, torch.Tensor]:
    return load_state(export_task(open_artifact(artifact), task, out / f"{artifact.name}-{task}"))


def tensor_bytes(folder: Path) -> int:
    """Bytes of the tensors stored in a folder's safetensors files (from their headers)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                piece = fh.get_slice(key)
                numel = int(np.prod(piece.get_shape()))
                size = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I64": 8}[piece.get_dtype()]
                total += numel * size
    return total


def test_size_m_is_every_expert_and_size_one_is_the_merge(zoo5: Path, tmp_path: Path) -> None:
    result = flex(zoo5, tmp_path / "flex", [1, 5])
    one, full = (r.folder for r in result.results)
    merged = mergecli.run_merge(
        mergecli.plan_merge(recipe_from_dict(recipe(zoo5))), tmp_path / "merged"
    ).output
    reference = load_state(merged)
    for task in TASKS:
        expert = load_state(zoo5 / task)
        got = exported(full, task, tmp_path)
        assert got.keys() == expert.keys()
        assert all(torch.equal(got[n], expert[n]) for n in expert)
        at_one = exported(one, task, tmp_path)
        assert all(torch.equal(at_one[n], reference[n]) for n in reference)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "emr", "tall_masks"])
def test_stored_bytes_are_the_reported_size(zoo5: Path, tmp_path: Path, method: str) -> None:
    low = 1.0 if method == "task_arithmetic" else 2.2
    sweep = [low, 2.5, 3.0, 3.7, 4.4, 5.0] if method != "task_arithmetic" else [1, 1.5, 2.2, 3, 4.5]
    result = flex(zoo5, tmp_path / "flex", sweep, method)
    one_model = tensor_bytes(zoo5 / "base")
    for r in result.results:
        measured = tensor_bytes(r.folder) / one_model
        assert abs(measured - r.size) <= 0.01 * r.size, (r.target, measured, r.size)
        assert r.size <= r.target + 1e-9
        manifest = read_json(r.folder / "flex.json")
        assert manifest["size"] == r.size and manifest["target"] == r.target
    # masks: the full merge stores base + unified + one bit per element and task
    if method != "task_arithmetic":
        expert = load_state(zoo5 / "e0")
        for task in TASKS:  # every export rebuilds the expert's shapes and dtypes
            got = exported(result.results[0].folder, task, tmp_path)
            assert {n: (t.shape, t.dtype) for n, t in got.items()} == {
                n: (t.shape, t.dtype) for n, t in expert.items()
            }


def brute_force_order(zoo: Path) -> list[tuple[str, list[int], list[int], float]]:
    """Greedy complete-linkage merging, written from the definition on dense task vectors."""
    base = load_state(zoo / "base")
    experts = [load_state(zoo / t) for t in TASKS]
    names = sorted(base)
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    cos: dict[str, np.ndarray] = {}
    for block, members in blocks.items():
        vectors = [
            torch.cat([(e[n] - base[n]).double().flatten() for n in members]) for e in experts
        ]
        cos[block] = np.array(
            [
                [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in vectors]
                for a in vectors
            ]
        )
    groups = {block: [[t] for t in range(len(TASKS))] for block in blocks}
    order = []
    while True:
        candidates = [
            (min(cos[block][i, j] for i in a for j in b), block, a, b)
            for block, gs in groups.items()
            for a, b in itertools.combinations(gs, 2)
        ]
        if not candidates:
            return order
        score, block, a, b = max(candidates, key=lambda c: c[0])
        groups[block] = [g for g in groups[block] if g not in (a, b)] + [sorted(a + b)]
        order.append((block, sorted(a), sorted(b), score))


def test_merge_order_is_the_greedy_min_similarity_rule(zoo5: Path, tmp_path: Path) -> None:
    result = flex(zoo5, tmp_path / "flex", [1])
    got = result.results[0].report["merge_order"]
    want = brute_force_order(zoo5)
    assert len(got) == len(want) == 15 * 4
    for step, (block, a, b, score) in zip(got, want, strict=True):
        assert step["block"] == block
        assert sorted([step["a"], step["b"]]) == sorted(
            [[TASKS[i] for i in a], [TASKS[i] for i in b]]
        )
        assert step["similarity"] == pytest.approx(score, abs=1e-9)
    sizes = [s["size_after"] for s in got]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == pytest.approx(1.0)


def test_serving_shares_blocks_between_tasks(zoo5: Path, tmp_path: Path) -> None:
    result = flex(zoo5, tmp_path / "flex", [2.5])
    folder = result.results[0].folder
    manifest = read_json(folder / "flex.json")
    states = task_state_dicts(folder)
    shared = 0
    for block in manifest["blocks"]:
        for group in block["groups"]:
            first, *others = group["tasks"]
            for name in block["tensors"]:
                for task in others:
                    assert states[task][name] is states[first][name]
                    shared += 1
        for a, b in itertools.combinations(block["groups"], 2):
            name = block["tensors"][0]
            assert states[a["tasks"][0]][name].data_ptr() != states[b["tasks"][0]][name].data_ptr()
    assert shared > 0
    models = task_models(folder)
    ptrs = {t: {n: p.data_ptr() for n, p in m.named_parameters()} for t, m in models.items()}
    for block in manifest["blocks"]:  # the models hold shared tensors too
        for group in block["groups"]:
            for name in block["tensors"]:
                assert len({ptrs[t][name] for t in group["tasks"]}) == 1
    for task in TASKS:
        expected = exported(folder, task, tmp_path)
        assert all(torch.equal(states[task][n], expected[n]) for n in expected)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert models["e0"](ids).logits.shape == (1, 4, 64)


def test_channel_merging_clusters_every_block_into_k_groups(zoo5: Path, tmp_path: Path) -> None:
    result = flex(zoo5, tmp_path / "channel", [2, 3], strategy="channel")
    again = flex(zoo5, tmp_path / "again", [2, 3], strategy="channel")
    for r, k in zip(result.results, (2, 3), strict=True):
        manifest = read_json(r.folder / "flex.json")
        assert r.size == pytest.approx(k) and manifest["strategy"] == "channel"
        assert all(len(b["groups"]) == k for b in manifest["blocks"])
        assert r.report["groups"] == again.results[k - 2].report["groups"]
    # a k-means fixed point: every expert is closest (in cosine) to its own cluster's centroid
    for b, gram in enumerate(result.grams):
        norms = np.sqrt(np.diag(gram))
        cos = gram / np.outer(norms, norms)
        manifest = read_json(result.results[0].folder / "flex.json")
        groups = [[TASKS.index(t) for t in g["tasks"]] for g in manifest["blocks"][b]["groups"]]
        for g in groups:
            for i in g:
                own = cos[i, g].sum() / np.sqrt(cos[np.ix_(g, g)].sum())
                for h in groups:
                    assert own >= cos[i, h].sum() / np.sqrt(cos[np.ix_(h, h)].sum()) - 1e-9


def test_cli_writes_sizes_and_export_loads(zoo5: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {**recipe(zoo5), "flex": {"linkage": "avg"}})
    out = tmp_path / "out"
    dry = run_cli("flex", path, "--size", "2", "--output", out, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["size_range"] == [1.0, 5.0] and not out.exists()
    res = run_cli(
        "flex", path, "--sizes", "1.5,3", "--output", out, "--json", "--order", "left_to_right"
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [s["target"] for s in summary["sizes"]] == [1.5, 3.0]
    report = read_json(out / "size-3" / "flex_report.json")
    assert report["linkage"] == "avg" and report["order"] == "left_to_right"
    blocks = [s["block"] for s in report["merge_order"]]
    assert blocks == sorted(blocks, key=[b["block"] for b in report["groups_per_block"]].index)
    assert (out / "size-3" / "flex_report.png").stat().st_size > 0
    res = run_cli("export", out / "size-3", "--task", "e2", "--output", tmp_path / "e2")
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "e2")
    assert model.config.num_hidden_layers == 3


def test_recipe_flex_section_is_strict(zoo5: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {**recipe(zoo5), "flex": {"linkge": "min", "sizes": [2]}})
    res = run_cli("flex", path, "--output", tmp_path / "out")
    assert (
        res.exit_code == 2 and "unknown key 'flex.linkge' (did you mean 'linkage'?)" in res.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "2.5", "--strategy", "channel"], "whole sizes only"),
        (["--size", "7"], "out of range"),
        (["--size", "0.5"], "out of range"),
        (["--size", "2", "--sizes", "1,2"], "give one of them"),
        (["--size", "2", "--linkage", "mini"], "did you mean 'min'"),
        (["--sizes", "1,x"], "comma-separated"),
        (["--size", "2", "--granularity", "model.(layers"], "invalid pattern"),
        (["--size", "3", "--method", "emr", "--strategy", "channel"], "task masks"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    zoo5: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    path = write_recipe(tmp_path, {**recipe(zoo5), "parameters": {}})
    res = run_cli("flex", path, "--output", tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_emr_smallest_size_is_emr_on_each_block(zoo5: Path, tmp_path: Path) -> None:
    """Every block fully merged: task t is θ0 + ξt (mt ⊙ τuni), the rescalers over the block."""
    smallest = plan_flex(recipe_from_dict(recipe(zoo5, "emr")), {"sizes": [5]}).smallest_size
    assert smallest == pytest.approx(2 + 5 / 32, rel=1e-3)  # base, unified, 5 one-bit masks
    result = flex(zoo5, tmp_path / "emr", [smallest], "emr")
    folder = result.results[0].folder
    manifest = read_json(folder / "flex.json")
    assert all(len(b["groups"]) == 1 for b in manifest["blocks"])
    base, experts = dense.load_inputs(zoo5, tuple(TASKS))
    for task_index, task in enumerate(TASKS):
        got = exported(folder, task, tmp_path)
        for block in manifest["blocks"]:
            names = block["tensors"]
            num, den = [0.0] * len(TASKS), [0.0] * len(TASKS)
            parts = {}
            for name in names:
                tvs = dense.task_vectors(base, experts, name)
                unified, masks = dense.emr_parts(tvs)
                parts[name] = (unified, masks)
                for t, (tv, mk) in enumerate(zip(tvs, masks, strict=True)):
                    num[t] += float(tv.double().abs().mean())
                    den[t] += float((unified * mk).double().abs().mean())
            scale = num[task_index] / den[task_index]
            for name in names:
                unified, masks = parts[name]
                want = base[name] + scale * (unified * masks[task_index])
                torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def brute_force(cos: np.ndarray, gram: np.ndarray, linkage: str) -> list[tuple[list, list]]:
    """One block's greedy merges under a linkage, from the definitions."""

    def score(a: list[int], b: list[int]) -> float:
        pairs = [cos[i, j] for i in a for j in b]
        if linkage == "max":
            return max(pairs)
        if linkage == "avg":
            return sum(pairs) / len(pairs)
        va = np.zeros(len(cos))
        vb = np.zeros(len(cos))
        va[a], vb[b] = 1.0, 1.0
        return float(va @ gram @ vb / np.sqrt((va @ gram @ va) * (vb @ gram @ vb)))

    groups = [[i] for i in range(len(cos))]
    steps = []
    while len(groups) > 1:
        a, b = max(itertools.combinations(groups, 2), key=lambda p: score(*p))
        groups = [g for g in groups if g not in (a, b)] + [sorted(a + b)]
        steps.append((a, b))
    return steps


@pytest.mark.parametrize("linkage", ["max", "avg", "merged"])
def test_linkages_follow_their_definitions(linkage: str) -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(size=40)
    vectors = [[shared * rng.uniform(0, 2) + rng.normal(size=40) for _ in range(6)] for _ in "ab"]
    grams = [np.array([[u @ v for v in vs] for u in vs]) for vs in vectors]
    steps = merge_order(grams, linkage, "left_to_right", seed=0)
    assert [s.block for s in steps] == [0] * 5 + [1] * 5
    for b, gram in enumerate(grams):
        norms = np.sqrt(np.diag(gram))
        want = brute_force(gram / np.outer(norms, norms), gram, linkage)
        got = [(list(s.a), list(s.b)) for s in steps if s.block == b]
        assert [sorted(p) for p in got] == [sorted(p) for p in want]
    assert [s.block for s in merge_order(grams, linkage, "right_to_left", 0)] == [1] * 5 + [0] * 5


def test_random_linkage_is_seeded() -> None:
    rng = np.random.default_rng(1)
    vs = rng.normal(size=(5, 30))
    grams = [vs @ vs.T, (vs * 2) @ vs.T]
    first, again = (
        merge_order(grams, "random", "greedy", 3),
        merge_order(grams, "random", "greedy", 3),
    )
    assert first == again and len(first) == 8
    others = [merge_order(grams, "random", "greedy", seed) for seed in range(4, 10)]
    assert any(o != first for o in others)


def test_group_seeds_follow_recipe_indices() -> None:
    """A DARE mask drawn for a group's second member is the one expert 4 gets in a full merge."""
    base = torch.zeros(3, 4)
    whole = TensorInputs("w", base, [base] * 5, [None] * 5, seed=7)
    group = TensorInputs("w", base, [base] * 2, [None] * 2, seed=7, expert_ids=[2, 4])
    assert torch.equal(group.bernoulli_mask(1, 0.5), whole.bernoulli_mask(4, 0.5))
    assert torch.equal(group.philox_mask(1, 0.5), whole.philox_mask(4, 0.5))


@pytest.mark.slow
def test_same_recipe_gives_identical_artifacts(zoo5: Path, tmp_path: Path) -> None:
    first = flex(zoo5, tmp_path / "a", [2.5], linkage="random").results[0].folder
    second = flex(zoo5, tmp_path / "b", [2.5], linkage="random").results[0].folder
    for name in ("flex.json", "model.safetensors", "flex_report.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
