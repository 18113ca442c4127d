"""mergecli moe with full fine-tunes: a sparse MoE model (Mixtral, Qwen3-MoE, Qwen2-MoE)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import mergecli
from mergecli.engine.output import output_lock
from mergecli.errors import OutputError
from mergecli.moe import load, plan_moe, run_moe
from scripts.fixtures import VOCAB, save_model
from tests.helpers import load_state, run_cli, write_recipe

PROMPTS = {
    "math": {"positive": ["w1 w2 w3", "w4 w5 w6 w7"], "negative": ["w40 w41"]},
    "code": {"positive": ["w20 w21"]},
}
INPUT = torch.tensor([[1, 5, 9, 13, 17, 21, 30, 2]])


def noisy_copy(base: Path, folder: Path, seed: int) -> Path:
    """The base plus seeded noise on every tensor (a stand-in fine-tune of any family)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return save_model(model, folder, torch.float32)


def tiny(cls: type, config: type, folder: Path) -> Path:
    torch.manual_seed(0)
    options = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_model(cls(config(**options)), folder, torch.float32)


@pytest.fixture(scope="session")
def qwen_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen")
    tiny(Qwen3ForCausalLM, Qwen3Config, root / "qwen3")
    tiny(Qwen2ForCausalLM, Qwen2Config, root / "qwen2")
    for family in ("qwen3", "qwen2"):
        for i, name in enumerate(("math", "code", "shared")):
            noisy_copy(root / family, root / f"{family}_{name}", 80 + i)
    return root


def write(folder: Path, base: Path, experts: dict[str, Path], **moe: object) -> Path:
    spec = {
        "base_model": str(base),
        "models": [{"model": str(p), "name": n} for n, p in experts.items()],
        "moe": {"experts_per_token": 2, **moe},
        "seed": 5,
        "output": str(folder / "out"),
    }
    return write_recipe(folder, spec)


def expected_map(arch: str) -> dict[str, str]:
    if arch == "mixtral":
        return {
            "gate_proj": "block_sparse_moe.experts.{e}.w1",
            "down_proj": "block_sparse_moe.experts.{e}.w2",
            "up_proj": "block_sparse_moe.experts.{e}.w3",
        }
    return {p: f"mlp.experts.{{e}}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_mixtral_from_llama_experts(zoo: Path, tmp_path: Path, gate_mode: str) -> None:
    experts = {"math": zoo / "math", "code": zoo / "code"}
    prompts = {} if gate_mode == "random" else {"prompts": PROMPTS}
    result = run_cli(
        "moe", write(tmp_path, zoo / "base", experts, gate_mode=gate_mode, **prompts), "--json"
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    state, base = load_state(out), load_state(zoo / "base")
    sources = {n: load_state(p) for n, p in experts.items()}
    mapping = expected_map("mixtral")
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(state[name], tensor), name
            continue
        prefix, projection = name.rsplit(".mlp.", 1)
        projection = projection.removesuffix(".weight")
        for e, expert in enumerate(experts):
            out_name = f"{prefix}.{mapping[projection].format(e=e)}.weight"
            assert torch.equal(state[out_name], sources[expert][name]), out_name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=INPUT).logits).all()
    gates = torch.stack([state[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(3)])
    if gate_mode == "random":
        again = tmp_path / "again"
        again.mkdir()
        path = write(again, zoo / "base", experts, gate_mode="random")
        assert run_cli("moe", path, "-q").exit_code == 0
        assert torch.equal(
            load_state(again / "out")["model.layers.1.block_sparse_moe.gate.weight"], gates[1]
        )
    else:
        want = (hidden_rows if gate_mode == "hidden" else cheap_rows)(zoo / "base", 3)
        torch.testing.assert_close(gates, want, atol=1e-5, rtol=0)
    assert load(out).config.architectures == ["MixtralForCausalLM"]
    assert json.loads((out / "moe.json").read_text())["kind"] == "sparse"


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cheap_rows(base: Path, layers: int) -> torch.Tensor:
    """mergekit-moe's cheap_embed: masked sum of one-hot · embedding over a padded batch."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    embed = load_state(base)["model.embed_tokens.weight"]

    def vector(prompts: list[str]) -> torch.Tensor:
        batch = tokenizer(
            [tokenizer.bos_token + p for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        onehot = torch.nn.functional.one_hot(batch["input_ids"], embed.shape[0]).float()
        h = (onehot @ embed * batch["attention_mask"].unsqueeze(-1)).sum((0, 1))
        return normalised(h)

    rows = []
    for p in PROMPTS.values():
        row = vector(p["positive"])
        if p.get("negative"):
            row = normalised(row - vector(p["negative"]))
        rows.append(row)
    return torch.stack(rows).expand(layers, -1, -1)


def hidden_rows(base: Path, layers: int) -> torch.Tensor:
    """The whole base's hidden states entering each layer at each prompt's last token."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def mean(prompts: list[str]) -> torch.Tensor:
        states = []
        for p in prompts:
            ids = tokenizer(tokenizer.bos_token + p, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = model(**ids, output_hidden_states=True)
            states.append(torch.stack([h[0, -1] for h in out.hidden_states[:layers]]))
        return torch.stack(states).mean(0)

    rows = []
    for p in PROMPTS.values():
        row = mean(p["positive"])
        if p.get("negative"):
            row = row - mean(p["negative"])
        rows.append(normalised(row))
    return torch.stack(rows, dim=1)


def test_experts_equal_to_the_base_give_the_base_model(zoo: Path, tmp_path: Path) -> None:
    """Routing weights of the top k sum to one: identical experts reproduce the base."""
    base = zoo / "base"
    path = write(tmp_path, base, {"a": base, "b": base}, gate_mode="random")
    assert run_cli("moe", path, "-q").exit_code == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    dense = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=INPUT).logits, dense(input_ids=INPUT).logits, atol=1e-5, rtol=0
        )


def test_qwen3_experts_make_qwen3_moe(qwen_zoo: Path, tmp_path: Path) -> None:
    base = qwen_zoo / "qwen3"
    experts = {"math": qwen_zoo / "qwen3_math", "code": qwen_zoo / "qwen3_code"}
    path = write(tmp_path, base, experts, gate_mode="hidden", prompts=PROMPTS)
    result = run_cli("moe", path, "-q")
    assert result.exit_code == 0, result.output
    state = load_state(tmp_path / "out")
    sources = {n: load_state(p) for n, p in experts.items()}
    for e, name in enumerate(experts):
        for p in ("gate_proj", "up_proj", "down_proj"):
            got = state[f"model.layers.1.mlp.experts.{e}.{p}.weight"]
            assert torch.equal(got, sources[name][f"model.layers.1.mlp.{p}.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.norm_topk_prob
    gates = torch.stack([state[f"model.layers.{i}.mlp.gate.weight"] for i in range(2)])
    torch.testing.assert_close(gates, hidden_rows(base, 2), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=INPUT).logits).all()


def test_qwen2_experts_make_qwen2_moe_with_a_shared_expert(qwen_zoo: Path, tmp_path: Path) -> None:
    base = qwen_zoo / "qwen2"
    experts = {"math": qwen_zoo / "qwen2_math", "code": qwen_zoo / "qwen2_code"}
    prompts = {**PROMPTS, "shared_expert": {"positive": ["w30 w31"]}}
    path = write(
        tmp_path,
        base,
        experts,
        gate_mode="cheap_embed",
        prompts=prompts,
        shared_expert=str(qwen_zoo / "qwen2_shared"),
    )
    result = run_cli("moe", path, "-q")
    assert result.exit_code == 0, result.output
    state = load_state(tmp_path / "out")
    shared = load_state(qwen_zoo / "qwen2_shared")
    for p in ("gate_proj", "up_proj", "down_proj"):
        got = state[f"model.layers.0.mlp.shared_expert.{p}.weight"]
        assert torch.equal(got, shared[f"model.layers.0.mlp.{p}.weight"])
    assert state["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=INPUT).logits).all()


def test_a_locked_output_is_refused_or_waited_for(zoo: Path, tmp_path: Path) -> None:
    experts = {"math": zoo / "math", "code": zoo / "code"}
    path = write(tmp_path, zoo / "base", experts, gate_mode="random")
    plan = plan_moe(mergecli.load_recipe(path))
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputError) as error:
            run_moe(plan, out)
        assert "being written by another mergecli run" in str(error.value)
    assert not out.exists()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with output_lock(out):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    result = run_moe(plan, out, wait=True)
    holder.join()
    assert result.report["bytes_read"] == sum(
        t.nbytes for name, t in load_state(out).items() if ".gate." not in name
    )


def test_shared_tensors_merged_with_a_merge_method(zoo: Path, tmp_path: Path) -> None:
    """merge_method merges attention, norms and embeddings; experts stay whole."""
    experts = {"math": zoo / "math", "code": zoo / "code"}
    spec = json.loads(
        json.dumps(
            {
                "merge_method": "task_arithmetic",
                "parameters": {"lambda": 0.5},
                "base_model": str(zoo / "base"),
                "models": [{"model": str(p), "name": n} for n, p in experts.items()],
                "moe": {"gate_mode": "random"},
                "output": str(tmp_path / "out"),
            }
        )
    )
    result = run_cli("moe", write_recipe(tmp_path, spec), "-q")
    assert result.exit_code == 0, result.output
    state, base = load_state(tmp_path / "out"), load_state(zoo / "base")
    sources = {n: load_state(p) for n, p in experts.items()}
    name = "model.layers.1.self_attn.q_proj.weight"
    want = base[name] + 0.5 * sum(s[name] - base[name] for s in sources.values())
    torch.testing.assert_close(state[name], want, atol=1e-6, rtol=0)
    w1 = "model.layers.1.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(state[w1], sources["code"]["model.layers.1.mlp.gate_proj.weight"])
    assert not (tmp_path / "out" / ".shared").exists()


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"gate_mode": "hidden"}, "moe.prompts.math: gate_mode hidden needs positive prompts"),
        (
            {"gate_mode": "hidden", "prompts": {**PROMPTS, "cod": {"positive": ["x"]}}},
            "moe.prompts.cod: no expert of that name (did you mean 'code'?)",
        ),
        ({"gate_mode": "random", "general": ["x"]}, "moe.general: not used by a sparse MoE"),
        (
            {"gate_mode": "random", "architecture": "qwen3_moe"},
            "moe.architecture: qwen3_moe is made from qwen3 models, the base is llama",
        ),
        ({"gate_mode": "random", "shared_expert": "x"}, "moe.shared_expert: mixtral has no"),
        ({"gate_mode": "random", "experts_per_token": 3}, "moe.top_k: 3 experts per token"),
    ],
)
def test_bad_sparse_recipes_fail_in_one_line(
    zoo: Path, tmp_path: Path, moe: dict, message: str
) -> None:
    experts = {"math": zoo / "math", "code": zoo / "code"}
    result = run_cli("moe", write(tmp_path, zoo / "base", experts, **moe))
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_expert_tensor_is_named(zoo: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = load_state(zoo / "math")
    del state["model.layers.2.mlp.up_proj.weight"]
    (tmp_path / "cut").mkdir()
    save_file(state, tmp_path / "cut" / "model.safetensors")
    path = write(
        tmp_path, zoo / "base", {"math": tmp_path / "cut", "code": zoo / "code"}, gate_mode="random"
    )
    with pytest.raises(mergecli.MergeError, match=r"has no tensor .model\.layers\.2\.mlp\.up_proj"):
        plan_moe(mergecli.load_recipe(path))


def test_training_updates_routers_and_experts_only(zoo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i, task in enumerate(("math", "code")):
        (data / task).mkdir(parents=True)
        lines = [" ".join(f"w{(5 * k + j + 20 * i) % 61}" for j in range(8)) for k in range(10)]
        (data / task / "train.txt").write_text("\n".join(lines) + "\n")
    experts = {"math": zoo / "math", "code": zoo / "code"}
    path = write(
        tmp_path,
        zoo / "base",
        experts,
        gate_mode="random",
        batch_size=4,
        train_data=str(data / "{task}" / "train.txt"),
    )
    result = run_cli("moe", path, "--train-steps", "12", "--lr", "0.01", "--json")
    assert result.exit_code == 0, result.output
    training = json.loads(result.stdout)["training"]
    assert len(training["loss"]) == 12 and training["loss"][-1] < training["loss"][0]
    assert training["examples"] == 20 and list(training["tasks"]) == ["math", "code"]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    untrained_out = tmp_path / "plain"
    assert run_cli("moe", path, "--output", untrained_out, "-q").exit_code == 0
    before = AutoModelForCausalLM.from_pretrained(untrained_out).state_dict()
    # the trained weights are written in the planned layout: the untrained folder's files, with
    # the same tensors in the same order; nothing is left beside them
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in untrained_out.iterdir()
    )
    for file in untrained_out.glob("*.safetensors"):
        plain, done = file.read_bytes(), (tmp_path / "out" / file.name).read_bytes()
        header = 8 + int.from_bytes(plain[:8], "little")  # names, dtypes, shapes, offsets
        assert len(done) == len(plain) and done[:header] == plain[:header]
    for name, tensor in before.items():
        changed = not torch.equal(trained[name], tensor)
        assert changed == (".gate." in name or ".experts." in name), name
    again = tmp_path / "again"
    assert (
        run_cli("moe", path, "--train-steps", "12", "--lr", "0.01", "-o", again, "-q").exit_code
        == 0
    )
    repeat = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(repeat[k], v) for k, v in trained.items())
    assert "## Training of routers and experts" in (tmp_path / "out" / "moe_report.md").read_text()


def test_training_without_data_says_so(zoo: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path, zoo / "base", {"math": zoo / "math", "code": zoo / "code"}, gate_mode="random"
    )
    result = run_cli("moe", path, "--train-steps", "3")
    assert result.exit_code == 2
    assert "--train-steps: no training data: set moe.train_data" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_tokenizer_fails_before_anything_is_written(zoo: Path, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "bare"
    shutil.copytree(zoo / "base", base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    path = write(tmp_path, base, {"math": zoo / "math", "code": zoo / "code"}, prompts=PROMPTS)
    result = run_cli("moe", path)
    assert result.exit_code == 2 and "no tokenizer in" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.mergecli-tmp-*"))


def test_expert_names_must_name_folders(zoo: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path, zoo / "base", {"../x": zoo / "math", "code": zoo / "code"}, gate_mode="random"
    )
    result = run_cli("moe", path)
    assert result.exit_code == 2
    assert "models[0].name: '../x' cannot name a folder of the output" in result.output
