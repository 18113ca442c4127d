"""FlexMerge details (paper §4.1, §4.3): PEFT experts sized in adapter modules with untouched
tensors stored once, task-specific heads kept per task and out of the size, and ``consensus``
as the paper's CONSENSUS (TALL masks over TIES)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig
from safetensors.torch import save_file

from mergecli.artifacts import open_artifact
from mergecli.artifacts.export import export_task
from mergecli.flex import plan_flex, run_flex
from mergecli.recipe import recipe_from_dict
from scripts.fixtures import make_adapter
from tests import dense
from tests.helpers import load_state, read_json, run_cli, write_random_experts, write_recipe
from tests.test_flex import TASKS, recipe, tensor_bytes


def exported(artifact: Path, task: str, out: Path) -> dict[str, torch.Tensor]:
    return load_state(export_task(open_artifact(artifact), task, out / f"{artifact.name}-{task}"))


# ---- PEFT experts: size in adapter modules, untouched tensors once ------------------------------

PEFT = {  # what each adapter changes in every layer of the tiny Llama (hidden 32, kv 16, mlp 64)
    "qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "qdown": LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]),
    "ia3": IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}


@pytest.mark.slow
def test_adapter_experts_are_sized_in_adapter_modules(zoo: Path, tmp_path: Path) -> None:
    experts = {
        n: make_adapter(zoo / "base", tmp_path / n, c, seed=50 + i)
        for i, (n, c) in enumerate(PEFT.items())
    }
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": {"normalize": True},
    }
    # Hand count per layer: q 32·32, k 16·32, v 16·32 (the attention block), down 32·64 (the
    # MLP block); every other tensor (embeddings, o_proj, gate/up, norms, lm_head) is untouched.
    attention, mlp, layers = 32 * 32 + 2 * 16 * 32, 32 * 64, 3
    unit = layers * (attention + mlp)
    whole = 64 * 32 * 2 + 32 + layers * (attention + 32 * 32 + 3 * 32 * 64 + 2 * 32)
    plan = plan_flex(recipe_from_dict(spec), {"sizes": [1, 2, 3]})
    assert plan.sizes.unit == "adapter modules"
    assert plan.sizes.model_bytes == 4 * unit and plan.summary()["size_range"] == [1.0, 3.0]
    assert [b.nbytes for b in plan.blocks] == [4 * attention, 4 * mlp] * layers
    result = run_flex(plan, tmp_path / "flex", force=True)
    base = load_state(zoo / "base")
    assert sum(t.numel() for t in base.values()) == whole
    for r in result.results:
        manifest = read_json(r.folder / "flex.json")
        groups = {b["name"]: len(b["groups"]) for b in manifest["blocks"]}
        # attention and MLP blocks weigh the same (2048 entries): size = mean groups per block
        assert attention == mlp and r.size == pytest.approx(sum(groups.values()) / len(groups))
        assert r.size <= r.target + 1e-9 and manifest["size_unit"] == "adapter modules"
        # untouched tensors are stored once, the adapter modules once per group
        assert tensor_bytes(r.folder) == 4 * (whole - unit) + round(4 * unit * r.size)
    full = result.results[-1].folder  # size 3: every task is its adapter's model
    got = {name: exported(full, name, tmp_path) for name in experts}
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert all(torch.equal(got[task][name], base[name]) for task in experts)
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # LoRA qv does not change k
    assert torch.equal(got["qv"][k_proj], base[k_proj])
    assert not torch.equal(got["ia3"][k_proj], base[k_proj])


def test_blocks_no_expert_changes_are_stored_and_counted_once(tmp_path: Path) -> None:
    """Four one-tensor blocks of 8×16, three experts; every expert leaves layer 2 as the base
    (a frozen part). It is stored once: size = (1 + Σ groups of the other blocks) / 4."""
    names = write_random_experts(tmp_path, 4, (8, 16), 3, seed=3, varied=False)
    base = load_state(tmp_path / "base")
    frozen = names[2]
    for t in range(3):
        state = load_state(tmp_path / f"e{t}")
        save_file({**state, frozen: base[frozen]}, tmp_path / f"e{t}" / "model.safetensors")
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"e{t}")} for t in range(3)],
    }
    result = run_flex(plan_flex(recipe_from_dict(spec), {"sizes": [1, 2, 3]}), tmp_path / "f")
    assert [r.size for r in result.results][-1] == pytest.approx((1 + 3 * 3) / 4)  # not 3
    for r in result.results:
        manifest = read_json(r.folder / "flex.json")
        assert manifest["shared"] == {frozen: frozen}
        assert [b["tensors"] for b in manifest["blocks"]] == [[n] for n in names if n != frozen]
        groups = sum(len(b["groups"]) for b in manifest["blocks"])
        assert r.size == pytest.approx((1 + groups) / 4)
        assert tensor_bytes(r.folder) == 4 * 8 * 16 * (1 + groups)
    got = exported(result.results[-1].folder, "e1", tmp_path)
    expert = load_state(tmp_path / "e1")
    assert all(torch.equal(got[n], expert[n]) for n in names)


# ---- task-specific heads -------------------------------------------------------------------------


def bert_parameters(config: dict[str, Any]) -> tuple[int, int]:
    """BERT sequence classifier's parameters by hand: (body, classification head)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    embeddings = (
        config["vocab_size"] + config["max_position_embeddings"] + config["type_vocab_size"]
    ) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    pooler = h * h + h
    labels = len(config["id2label"])
    return embeddings + n * layer + pooler, h * labels + labels


@pytest.mark.slow
def test_heads_stay_per_task_and_out_of_the_size(testbed: Path, tmp_path: Path) -> None:
    tasks = read_json(testbed / "testbed.json")["tasks"]
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"experts/{t}", "name": t} for t in tasks],
        "parameters": {"lambda": 0.3},
    }
    path = write_recipe(testbed, spec, "details-heads.yaml")
    out = tmp_path / "heads"
    m = len(tasks)
    res = run_cli(
        "flex", path, "--sizes", f"1,2,{m}", "--heads", "^classifier\\.", "-o", out, "--json"
    )
    assert res.exit_code == 0, res.output
    body, head = bert_parameters(json.loads((testbed / "base" / "config.json").read_text()))
    base = load_state(testbed / "base")
    assert sum(t.numel() for t in base.values()) == body + head
    experts = [load_state(testbed / "experts" / t) for t in tasks]
    for row in json.loads(res.stdout)["sizes"]:
        folder = Path(row["folder"])
        report = read_json(folder / "flex_report.json")
        assert report["model_bytes"] == 4 * body
        assert sorted(report["heads"]) == ["classifier.bias", "classifier.weight"]
        # the size leaves the heads out; the artifact holds every task's head besides
        assert tensor_bytes(folder) == round(4 * body * row["size"]) + 4 * m * head
        for t, task in enumerate(tasks):
            got = exported(folder, task, tmp_path)
            for name in ("classifier.weight", "classifier.bias"):
                assert torch.equal(got[name], experts[t][name])
    got = exported(out / "size-1", tasks[0], tmp_path / "again")  # the body: one merge
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.bias"):
        want = base[name] + 0.3 * sum(e[name] - base[name] for e in experts)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_lm_head_named_a_head_is_each_experts_own(zoo5: Path, tmp_path: Path) -> None:
    """Tiny Llama by hand: 31,968 parameters, lm_head 64 × 32; at size 1 the artifact holds one
    model without its head plus the five experts' heads."""
    plan = plan_flex(recipe_from_dict(recipe(zoo5)), {"sizes": [1], "heads": [r"^lm_head\."]})
    whole, head = 31968, 64 * 32
    assert [t.name for t in plan.heads] == ["lm_head.weight"]
    assert plan.sizes.model_bytes == 4 * (whole - head)
    result = run_flex(plan, tmp_path / "f")
    folder = result.results[0].folder
    assert result.results[0].size == 1.0
    assert tensor_bytes(folder) == 4 * (whole - head) + 4 * len(TASKS) * head
    for task in TASKS:
        got = exported(folder, task, tmp_path)
        assert torch.equal(got["lm_head.weight"], load_state(zoo5 / task)["lm_head.weight"])


def test_head_pattern_matching_nothing_is_an_error(zoo5: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path, recipe(zoo5))
    res = run_cli("flex", path, "--size", "2", "--heads", "classifier", "--dry-run")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "flex.heads[0]: 'classifier' matches no merged tensor" in res.stderr


# ---- consensus: the paper's CONSENSUS ------------------------------------------------------------


@pytest.mark.slow
def test_consensus_is_tall_masks_over_ties(zoo5: Path, tmp_path: Path) -> None:
    """At the smallest size task t is θ0 + mt ⊙ τTIES, mt = [abs(τt) > 0.6·abs(τTIES − τt)],
    τTIES the TIES merge (trim to density, mass sign election, disjoint mean, no scaling)."""
    spec = {**recipe(zoo5, "consensus"), "parameters": {"density": 0.3, "scope": "tensor"}}
    path = write_recipe(tmp_path, spec)
    res = run_cli("flex", path, "--size", str(2 + 5 / 32), "-o", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    assert "FlexMerge runs the paper's CONSENSUS, tall_masks with use_ties: true" in res.stderr
    manifest = read_json(tmp_path / "out" / "flex.json")
    assert manifest["method"] == "tall_masks"
    assert all(len(b["groups"]) == 1 for b in manifest["blocks"])
    base, experts = dense.load_inputs(zoo5, tuple(TASKS))
    for t, task in enumerate(TASKS):
        got = exported(tmp_path / "out", task, tmp_path)
        for name in base:
            tvs = dense.task_vectors(base, experts, name)
            trimmed = [tv * (tv.abs() >= dense.top_k(tv, 0.3)) for tv in tvs]
            ties = dense.ties_vector(trimmed, [1.0] * len(tvs))
            mask = tvs[t].abs() > 0.6 * (ties - tvs[t]).abs()
            torch.testing.assert_close(got[name], base[name] + mask * ties, rtol=0, atol=1e-6)


@pytest.mark.parametrize("where", ["parameters", "models[1].parameters"])
def test_consensus_merging_parameters_get_a_pointer(zoo5: Path, tmp_path: Path, where: str) -> None:
    spec = recipe(zoo5, "consensus")
    if where == "parameters":
        spec["parameters"] = {"k": 2}
    else:
        spec["models"][1]["parameters"] = {"k": 2}
    path = write_recipe(tmp_path, spec)
    res = run_cli("flex", path, "--size", "3", "--dry-run")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"{where}.k: in mergecli flex, consensus is the FlexMerge paper's CONSENSUS" in (
        res.stderr
    )
