"""Temporal merging: EMA and deploy-all against unrolled dense computations, atomic steps,
strategies, replay, errors, and the memory of a long sequence."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergecli.engine.writer import ShardWriter
from mergecli.methods.inputs import seed_for
from mergecli.temporal import add_expert, init_state, status
from mergecli.temporal.fold import step_seed
from mergecli.temporal.state import locked
from scripts.fixtures import make_base
from tests.dense import philox_uniform
from tests.helpers import ROOT, load_state, run_cli, write_recipe

W = 0.3
SEQ = ("math", "code", "chat", "math")
CASES = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}),
    "ties": ("ties", {"density": 0.3}),
}

State = dict[str, torch.Tensor]


def dense(folder: Path) -> State:
    return {k: v.float() for k, v in load_state(folder).items()}


def kth_largest(values: torch.Tensor, density: float) -> float:
    n = values.numel()
    k = math.ceil(round(density * n, 9))
    return torch.kthvalue(values.abs().flatten(), n - k + 1).values.item()


def dense_ties(base: State, models: list[State], weights: list[float], density: float) -> State:
    """TIES with model-scope thresholds over each whole task vector, λ = 1."""
    names = sorted(base)
    tvs = [{k: m[k] - base[k] for k in names} for m in models]
    kappas = [kth_largest(torch.cat([tv[k].flatten() for k in names]), density) for tv in tvs]
    out = {}
    for k in names:
        trimmed = [
            torch.where(tv[k].abs() >= kap, tv[k], 0.0) for tv, kap in zip(tvs, kappas, strict=True)
        ]
        gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
        num, den = torch.zeros_like(base[k]), torch.zeros_like(base[k])
        for tv, w in zip(trimmed, weights, strict=True):
            agree = (tv != 0) & (torch.sign(tv) == gamma)
            num += tv * agree * w
            den += agree * w
        out[k] = base[k] + torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return out


def dense_ema(case: str, base: State, experts: list[State]) -> State:
    """EMA_T unrolled: closed forms for linear and task arithmetic, a loop of dense TIES."""
    steps = len(experts)
    if case == "linear":
        return {
            k: (1 - W) ** steps * b
            + sum(W * (1 - W) ** (steps - t) * e[k] for t, e in enumerate(experts, 1))
            for k, b in base.items()
        }
    if case == "task_arithmetic":
        lam = CASES[case][1]["lambda"]
        return {
            k: b
            + sum(
                W * lam ** (steps - t + 1) * (1 - W) ** (steps - t) * (e[k] - b)
                for t, e in enumerate(experts, 1)
            )
            for k, b in base.items()
        }
    ema = base
    for expert in experts:
        ema = dense_ties(base, [ema, expert], [1 - W, W], CASES[case][1]["density"])
    return ema


def dense_all(case: str, base: State, experts: list[State]) -> State:
    """The merge of every expert so far, unit weights."""
    if case == "linear":
        return {k: sum(e[k] for e in experts) / len(experts) for k in base}
    if case == "task_arithmetic":
        lam = CASES[case][1]["lambda"]
        return {k: b + lam * sum(e[k] - b for e in experts) for k, b in base.items()}
    return dense_ties(base, experts, [1.0] * len(experts), CASES[case][1]["density"])


def assert_same(got: State, want: State) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-6, rtol=1e-6, msg=name)


def init_args(state: Path, zoo: Path, method: str, params: dict, *extra: str) -> list:
    pairs = [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
    return ["temporal", "init", state, "--base", zoo / "base", "--method", method, *pairs, *extra]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if "ties" in c else c for c in CASES]
)
def test_ema_and_all_equal_unrolled_dense_computation(zoo: Path, tmp_path: Path, case: str):
    method, params = CASES[case]
    state = tmp_path / "state"
    args = init_args(state, zoo, method, params, "--deploy", "all", "--ema-weight", str(W))
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    base = dense(zoo / "base")
    experts = {name: dense(zoo / name) for name in set(SEQ)}
    for t, name in enumerate(SEQ, 1):
        result = run_cli("temporal", "add", state, zoo / name, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["step"] == t and [m["model"] for m in summary["merges"]] == ["ema", "all"]
        folded = [experts[n] for n in SEQ[:t]]
        assert_same(dense(state / "init"), dense_ema(case, base, folded))
        assert_same(dense(state / "deploy"), dense_all(case, base, folded))
    assert os.readlink(state / "init") == "steps/0004/ema"
    assert sorted(p.name for p in (state / "steps").iterdir()) == ["0004"]


def test_dare_ema_draws_fresh_masks_each_step(zoo: Path, tmp_path: Path) -> None:
    state, density = tmp_path / "state", 0.6
    settings = {
        "merge_method": "dare_linear",
        "base_model": str(zoo / "base"),
        "parameters": {"density": density},
        "seed": 5,
        "temporal": {"ema_weight": W},
    }
    init_state(state, settings)
    base = dense(zoo / "base")
    ema = base
    for t, name in enumerate(("math", "code"), 1):
        add_expert(state, zoo / name)
        expert, seed = dense(zoo / name), step_seed(5, t)
        nxt = {}
        for k, b in base.items():
            dropped = []
            for i, model in enumerate((ema, expert)):
                mask = philox_uniform(seed_for(seed, i, k), b.shape) < density
                dropped.append((model[k] - b) * mask / density)
            nxt[k] = b + (1 - W) * dropped[0] + W * dropped[1]
        ema = nxt
        assert_same(dense(state / "deploy"), ema)


@pytest.mark.parametrize("init", ["base", "latest", "ema"])
@pytest.mark.parametrize("deploy", ["latest", "ema", "all"])
def test_strategies_link_the_right_models_and_store_no_more(
    zoo: Path, tmp_path: Path, init: str, deploy: str
) -> None:
    state = tmp_path / "state"
    settings = {
        "merge_method": "linear",
        "base_model": str(zoo / "base"),
        "temporal": {"init": init, "deploy": deploy},
    }
    _, warnings = init_state(state, settings)
    assert bool(warnings) == (init == "base" and deploy == "latest")
    assert (state / "init").resolve() == (state / "deploy").resolve() == (zoo / "base").resolve()
    for name in ("math", "code"):
        result = add_expert(state, zoo / name)
    models = {
        "base": zoo / "base",
        "latest": zoo / "code",
        "ema": state / "steps/0002/ema",
        "all": state / "steps/0002/all",
    }
    assert (state / "init").resolve() == result.init_model == models[init].resolve()
    assert (state / "deploy").resolve() == result.deploy_model == models[deploy].resolve()
    stored = {str(p.relative_to(state)) for p in state.glob("steps/*/*")}
    want = {"steps/0002/ema"} if "ema" in (init, deploy) else set()
    assert stored == want | ({"steps/0002/all"} if deploy == "all" else set())
    info = status(state)
    needed = [True, True] if deploy == "all" else [False, "latest" in (init, deploy)]
    assert [e["needed"] for e in info["experts"]] == needed
    assert (info["disk"]["ema_bytes"] > 0) == ("ema" in (init, deploy))
    for model in ("init", "deploy"):  # a standard Hugging Face folder
        assert {"config.json", "tokenizer.json"} <= {p.name for p in (state / model).iterdir()}


def snapshot(folder: Path) -> dict[str, object]:
    """Every file's bytes and every link's target under a state (the lock file aside)."""
    out: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file() and name != ".lock":
                out[rel] = path.read_bytes()
    return out


def two_step_state(zoo: Path, folder: Path) -> Path:
    settings = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "parameters": {"density": 0.4},
        "temporal": {"init": "ema", "deploy": "all"},
    }
    init_state(folder, settings)
    add_expert(folder, zoo / "math")
    add_expert(folder, zoo / "code")
    return folder


def model_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three uninterrupted steps, to compare interrupted-and-rerun states with."""
    state = two_step_state(zoo, tmp_path_factory.mktemp("reference") / "state")
    add_expert(state, zoo / "chat")
    return state


@pytest.mark.slow
@pytest.mark.parametrize("fail_after", [3, 33], ids=["in-ema-merge", "in-all-merge"])
def test_interrupted_add_keeps_the_state_and_rerun_completes(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path, fail_after: int
) -> None:
    state = two_step_state(zoo, tmp_path / "state")
    assert len(load_state(zoo / "base")) == 30  # so 33 fails in the second merge (all)
    before = snapshot(state)
    written = 0
    original = ShardWriter.write

    def failing_write(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        nonlocal written
        written += 1
        if written > fail_after:
            raise RuntimeError("injected failure")
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="injected failure"):
        add_expert(state, zoo / "chat")
    assert snapshot(state) == before
    monkeypatch.undo()
    result = add_expert(state, zoo / "chat")
    assert result.added and result.step == 3
    for model in ("init", "deploy"):
        assert model_bytes(state / model) == model_bytes(reference / model)


KILL_SCRIPT = """
import os, sys
from mergecli.engine.writer import ShardWriter
from mergecli.temporal import add_expert
original, count = ShardWriter.write, [0]
def write(self, name, tensor):
    count[0] += 1
    if count[0] > 10:
        os._exit(9)
    original(self, name, tensor)
ShardWriter.write = write
add_expert(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
def test_killed_add_leaves_the_state_intact_and_rerun_cleans_up(
    zoo: Path, tmp_path: Path, reference: Path
) -> None:
    state = two_step_state(zoo, tmp_path / "state")
    before = snapshot(state)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(state), str(zoo / "chat")], env=env, check=False
    )
    assert killed.returncode == 9
    leftovers = set(snapshot(state)) - set(before)
    # a killed run leaves its temporary folder and the lock file (no longer locked)
    assert leftovers and all(".mergecli-tmp-" in p or ".mergecli-lock" in p for p in leftovers)
    assert {k: v for k, v in snapshot(state).items() if k in before} == before
    assert add_expert(state, zoo / "chat").added
    assert not any(".mergecli-" in p for p in snapshot(state))
    for model in ("init", "deploy"):
        assert model_bytes(state / model) == model_bytes(reference / model)


def test_rerun_after_the_commit_finishes_links_and_cleanup(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path
) -> None:
    import mergecli.temporal.fold as fold

    state = two_step_state(zoo, tmp_path / "state")

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fold, "settle", crash)
    with pytest.raises(KeyboardInterrupt):
        add_expert(state, zoo / "chat")
    monkeypatch.undo()
    assert os.readlink(state / "deploy") == "steps/0002/all"  # stale, the step is committed
    result = add_expert(state, zoo / "chat")
    assert not result.added and result.step == 3
    assert os.readlink(state / "deploy") == "steps/0003/all"
    assert sorted(p.name for p in (state / "steps").iterdir()) == ["0003"]
    assert status(state)["steps"] == 3
    for model in ("init", "deploy"):
        assert model_bytes(state / model) == model_bytes(reference / model)


def temporal_recipe(
    zoo: Path, folder: Path, file: str, names: tuple[str, ...], **temporal: object
) -> Path:
    recipe = {
        "merge_method": "linear",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in names],
        "output": "study",
        "temporal": {"ema_weight": W, **temporal},
    }
    return write_recipe(folder, recipe, file)


def test_recipe_replay_keeps_each_steps_deploy_model_and_resumes(zoo: Path, tmp_path: Path):
    short = temporal_recipe(zoo, tmp_path, "short.yaml", SEQ[:2], keep_steps=True)
    result = run_cli("temporal", short, "--quiet")
    assert result.exit_code == 0, result.output
    full = temporal_recipe(zoo, tmp_path, "full.yaml", SEQ, keep_steps=True)
    result = run_cli("temporal", full, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["resumed_at"] == 2 and [s["step"] for s in summary["steps"]] == [3, 4]
    state = tmp_path / "study"
    base = dense(zoo / "base")
    info = status(state)
    for t, expert in enumerate(info["experts"], 1):
        assert expert["deploy"] == str(state / f"steps/{t:04d}/ema")
        folded = [dense(zoo / n) for n in SEQ[:t]]
        assert_same(dense(Path(expert["deploy"])), dense_ema("linear", base, folded))
    kept = [f for t in (1, 2, 3) for f in (state / f"steps/{t:04d}/ema").iterdir()]
    assert info["disk"]["kept_steps_bytes"] == sum(f.stat().st_size for f in kept)
    again = run_cli("temporal", "replay", full, "--json")
    assert json.loads(again.stdout)["steps"] == []
    text = run_cli("temporal", "status", state)
    assert text.exit_code == 0 and "4 steps" in text.output and "keeps every step" in text.output


def test_errors_are_one_line_and_name_the_problem(zoo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"

    def fails(*args: object, match: str) -> None:
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert match in result.output, result.output

    fails(*init_args(state, zoo, "tiez", {}), match="did you mean 'ties'")
    fails(*init_args(state, zoo, "ties", {"densty": 0.3}), match="did you mean 'density'")
    fails(*init_args(state, zoo, "linear", {"weight": 2}), match="set by temporal merging")
    fails(*init_args(state, zoo, "linear", {}, "--ema-weight", "0"), match="temporal.ema_weight")
    fails(*init_args(state, zoo, "linear", {}, "--out-dtype", "fp33"), match="unknown dtype")
    assert not state.exists()
    assert run_cli(*init_args(state, zoo, "linear", {}, "--deploy", "all")).exit_code == 0
    fails(*init_args(state, zoo, "linear", {}), match="use --force")
    fails(*init_args(zoo, zoo, "linear", {}, "--force"), match="not a temporal state")
    fails("temporal", "add", state, tmp_path / "nope", match="does not exist")
    fails("temporal", "stauts", state, match="Did you mean 'status'")
    fails("temporal", "status", tmp_path / "none", match="does not exist")

    moved = tmp_path / "moved"
    shutil.copytree(zoo / "math", moved)
    assert run_cli("temporal", "add", state, moved, "--quiet").exit_code == 0
    shutil.move(moved, tmp_path / "elsewhere")
    assert status(state)["experts"][0]["source"] == "missing"
    fails("temporal", "add", state, zoo / "code", match="step 1 expert")
    with locked(state):
        fails("temporal", "add", state, zoo / "code", match="another process")

    recipe = temporal_recipe(zoo, tmp_path, "one.yaml", ("math",))
    fails("merge", recipe, match="mergecli temporal")
    typo = write_recipe(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": "x"}], "temporal": {"deploi": "all"}},
        "typo.yaml",
    )
    fails("temporal", typo, match="did you mean 'deploy'")
    assert run_cli("temporal", recipe, "--quiet").exit_code == 0
    other = temporal_recipe(zoo, tmp_path, "other.yaml", ("math",), deploy="latest")
    fails("temporal", other, match="other settings (temporal)")


MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
from mergecli.temporal import add_expert, init_state

def kib(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

root, steps = Path(sys.argv[1]), int(sys.argv[2])
state = root / f"state-{steps}"
settings = {"merge_method": "linear", "base_model": str(root / "base"),
            "temporal": {"init": "ema", "deploy": "ema"}}
init_state(state, settings)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current resident size
baseline = kib("VmHWM")
for i in range(steps):
    add_expert(state, root / f"e{i:02d}")
print(json.dumps({"growth": kib("VmHWM") - baseline}))
"""


@pytest.mark.slow
def test_twenty_steps_peak_at_the_memory_of_one_merge(tmp_path: Path) -> None:
    """Peak resident memory above the post-import baseline: 20 EMA steps vs 1 (one merge).

    The peak is Linux's VmHWM, reset after the imports (they peak higher than a merge).

    glibc's adaptive mmap threshold keeps freed tensor memory in its arenas, which blurs RSS by
    a few MB at random; a fixed threshold makes RSS follow live tensors, as the test needs.
    """
    base = make_base(
        tmp_path / "base", hidden_size=256, intermediate_size=1024, num_hidden_layers=2
    )
    state = load_state(base)
    nbytes = sum(t.nbytes for t in state.values())
    assert nbytes > 7_000_000
    noise = torch.randn(
        sum(t.numel() for t in state.values()), generator=torch.Generator().manual_seed(0)
    )
    for i in range(20):
        folder = tmp_path / f"e{i:02d}"
        folder.mkdir()
        offset, expert = 0, {}
        for k, t in state.items():
            expert[k] = t + 0.01 * (i + 1) * noise[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
        save_file(expert, folder / "model.safetensors")
        shutil.copy(base / "config.json", folder / "config.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    growth = {}
    for steps in (1, 20):
        run = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        growth[steps] = json.loads(run.stdout)["growth"]
    assert growth[1] > nbytes  # the merge itself registers (its inputs are mapped, too)
    assert growth[20] < growth[1] + 0.75 * nbytes, (growth, nbytes)  # less than one more model
