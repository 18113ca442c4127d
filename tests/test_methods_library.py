"""Every method of the library against a dense whole-tensor computation of its METHODS.md formula.

Three sharded tiny Llama experts in float32; the merged tensors must match to 1e-6.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergecli
from mergecli.engine.runner import Runner
from mergecli.engine.threads import available_cores
from mergecli.methods.breadcrumbs import THRESHOLDS
from mergecli.methods.inputs import seed_for
from mergecli.methods.statistics import BINS, LargestMagnitudes
from mergecli.recipe import recipe_from_dict
from tests import dense
from tests.conftest import EXPERTS
from tests.helpers import load_state, run_cli, write_recipe

WEIGHTS = (1.0, 0.5, 2.0)


def recipe(
    zoo: Path,
    out: Path,
    method: str,
    params: dict[str, Any] | None = None,
    per_model: dict[str, tuple] | None = None,
    names: tuple[str, ...] = EXPERTS,
    **extra: Any,
) -> dict[str, Any]:
    models = [
        {"model": str(zoo / n), "parameters": {k: v[i] for k, v in (per_model or {}).items()}}
        for i, n in enumerate(names)
    ]
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": models,
        "parameters": params or {},
        "output": str(out),
        **extra,
    }


def merged(zoo: Path, tmp: Path, method: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Merge through the CLI (small shards) and load the result."""
    out = tmp / f"out-{method}"
    path = write_recipe(tmp, recipe(zoo, out, method, *args, **kwargs), f"{method}.yaml")
    result = run_cli("merge", path, "--shard-size", "30KB", "--quiet", "--force")
    assert result.exit_code == 0, result.output
    return load_state(out)


def assert_states_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


def expected(zoo: Path, fn: Any, names: tuple[str, ...] = EXPERTS) -> dict[str, torch.Tensor]:
    """θ for every tensor from ``fn(name, base tensor, task vectors)``."""
    base, experts = dense.load_inputs(zoo, names)
    return {k: fn(k, b, dense.task_vectors(base, experts, k)) for k, b in base.items()}


# ---- ties options ------------------------------------------------------------------------------

TIES_CASES = {
    "sum": {"merge_func": "sum"},
    "max": {"merge_func": "max"},
    "count": {"sign": "count"},
    "normalize_false": {"normalize": False},
    "tensor_count_max": {"scope": "tensor", "sign": "count", "merge_func": "max"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TIES_CASES))
def test_ties_options(zoo: Path, tmp_path: Path, case: str) -> None:
    options = TIES_CASES[case]
    densities = (0.3, 0.5, 0.25)
    got = merged(
        zoo, tmp_path, "ties", {"lambda": 0.8, **options}, {"density": densities, "weight": WEIGHTS}
    )
    base, experts = dense.load_inputs(zoo)
    whole = dense.concatenated(base, experts)
    model_kappa = [dense.top_k(c, d) for c, d in zip(whole, densities, strict=True)]
    merge_func = options.get("merge_func", "mean" if options.get("normalize", True) else "sum")

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        kappa = (
            [dense.top_k(tv, d) for tv, d in zip(tvs, densities, strict=True)]
            if options.get("scope") == "tensor"
            else model_kappa
        )
        trimmed = [tv * (tv.abs() >= k) for tv, k in zip(tvs, kappa, strict=True)]
        sign = options.get("sign", "mass")
        return b + 0.8 * dense.ties_vector(trimmed, list(WEIGHTS), merge_func, sign)

    assert_states_close(got, expected(zoo, fn))


# ---- breadcrumbs -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_breadcrumbs(zoo: Path, tmp_path: Path, scope: str) -> None:
    densities, gammas = (0.6, 0.5, 0.8), (0.05, 0.1, 0.013)
    got = merged(
        zoo,
        tmp_path,
        "breadcrumbs",
        {"lambda": 0.7, "scope": scope},
        {"density": densities, "gamma": gammas, "weight": WEIGHTS},
    )
    base, experts = dense.load_inputs(zoo)
    if scope == "model":
        whole = [
            dense.split(dense.rank_window(c, d, g), base)
            for c, d, g in zip(dense.concatenated(base, experts), densities, gammas, strict=True)
        ]

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        if scope == "model":
            kept = [w[name] for w in whole]
        else:
            kept = [
                dense.rank_window(tv, d, g) for tv, d, g in zip(tvs, densities, gammas, strict=True)
            ]
        return b + 0.7 * sum(w * k for w, k in zip(WEIGHTS, kept, strict=True))

    assert_states_close(got, expected(zoo, fn))


def test_breadcrumbs_ties(zoo: Path, tmp_path: Path) -> None:
    got = merged(
        zoo,
        tmp_path,
        "breadcrumbs_ties",
        {"density": 0.5, "gamma": 0.1, "scope": "tensor"},
        {"weight": WEIGHTS},
    )

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        kept = [dense.rank_window(tv, 0.5, 0.1) for tv in tvs]
        return b + dense.ties_vector(kept, list(WEIGHTS))

    assert_states_close(got, expected(zoo, fn))


def test_model_scope_breadcrumbs_thresholds_equal_kthvalue(zoo: Path, tmp_path: Path) -> None:
    """The streaming statistic's two rank thresholds equal torch.kthvalue on the concatenation."""
    densities, gammas = (0.6, 0.5, 0.8), (0.05, 0.1, 0.013)
    plan = mergecli.plan_merge(
        recipe_from_dict(
            recipe(zoo, tmp_path / "o", "breadcrumbs", {}, {"density": densities, "gamma": gammas})
        )
    )
    assert plan.passes == 3
    stats = mergecli.engine.merge.statistics(plan, Runner())
    base, experts = dense.load_inputs(zoo)
    for t, whole in enumerate(dense.concatenated(base, experts)):
        n = whole.numel()
        ranks = [
            math.floor(round(gammas[t] * n, 9)),
            math.floor(round((gammas[t] + densities[t]) * n, 9)),
        ]
        assert stats[THRESHOLDS][t] == [dense.kth_largest(whole, r) for r in ranks]


# ---- della -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_della(zoo: Path, tmp_path: Path) -> None:
    densities, epsilons = (0.5, 0.4, 0.7), (0.1, 0.2, 0.05)
    got = merged(
        zoo,
        tmp_path,
        "della",
        {"lambda": 1.1},
        {"density": densities, "epsilon": epsilons, "weight": WEIGHTS},
        seed=5,
    )

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        dropped = []
        for t, tv in enumerate(tvs):
            keep = dense.della_keep(tv, densities[t], epsilons[t])
            uniform = dense.philox_uniform(seed_for(5, t, name), tv.shape)
            dropped.append(tv * (uniform < keep) / keep.float())
        return b + 1.1 * dense.ties_vector(dropped, list(WEIGHTS))

    assert_states_close(got, expected(zoo, fn))


def dense_expert(zoo: Path, folder: Path, seed: int) -> Path:
    """A copy of the base with a dense Gaussian task vector (no zero entries)."""
    shutil.copytree(zoo / "base", folder)
    gen = torch.Generator().manual_seed(seed)
    for file in folder.glob("*.safetensors"):
        state = load_file(file)
        save_file(
            {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, file
        )
    return folder


def test_della_keeps_density_and_preserves_the_mean(zoo: Path, tmp_path: Path) -> None:
    density, epsilon = 0.4, 0.15
    expert = dense_expert(zoo, tmp_path / "expert", seed=3)
    out = tmp_path / "one"
    r = {
        "merge_method": "della",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(expert)}],
        "parameters": {"density": density, "epsilon": epsilon},
        "seed": 9,
        "output": str(out),
    }
    assert run_cli("merge", write_recipe(tmp_path, r), "--quiet").exit_code == 0
    base = load_state(zoo / "base")
    tv = torch.cat([(load_state(expert)[k] - base[k]).flatten() for k in sorted(base)]).double()
    got = torch.cat([(load_state(out)[k] - base[k]).flatten() for k in sorted(base)]).double()
    assert bool((tv != 0).all())
    n = tv.numel()
    kept = int((got != 0).sum()) / n
    assert abs(kept - density) < 3 * math.sqrt(density * (1 - density) / n)
    # every kept entry is rescaled by 1/p with p in [density − ε, density + ε]
    ratio = got[got != 0] / tv[got != 0]
    assert float(ratio.min()) >= 1 / (density + epsilon) - 1e-4
    assert float(ratio.max()) <= 1 / (density - epsilon) + 1e-4
    # E[τ̃] = τ: the sum is preserved within 3σ, σ² ≤ Σ τ² (1 − p) / p
    p_min = density - epsilon
    sigma = math.sqrt(float((tv**2).sum()) * (1 - p_min) / p_min)
    assert abs(float(got.sum() - tv.sum())) < 3 * sigma
    # larger magnitudes are kept more often: the kept entries' mean abs beats the dropped ones'
    assert float(tv[got != 0].abs().mean()) > float(tv[got == 0].abs().mean())


@pytest.mark.slow
def test_della_reruns_are_byte_identical_across_thread_counts(zoo: Path, tmp_path: Path) -> None:
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"o{threads}"
            r = recipe(zoo, out, "della", {"density": 0.5, "epsilon": 0.2}, seed=13)
            assert (
                run_cli("merge", write_recipe(tmp_path, r, f"r{threads}.yaml"), "--quiet").exit_code
                == 0
            )
            outs.append((out / "model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]
    other = tmp_path / "other"
    r = recipe(zoo, other, "della", {"density": 0.5, "epsilon": 0.2}, seed=14)
    assert run_cli("merge", write_recipe(tmp_path, r, "other.yaml"), "--quiet").exit_code == 0
    assert (other / "model.safetensors").read_bytes() != outs[0]


# ---- magmax, slerp, model_stock ----------------------------------------------------------------


@pytest.mark.slow
def test_magmax(zoo: Path, tmp_path: Path) -> None:
    got = merged(zoo, tmp_path, "magmax", {"lambda": 0.9})

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        best = tvs[0]
        for tv in tvs[1:]:
            best = torch.where(tv.abs() > best.abs(), tv, best)
        return b + 0.9 * best

    assert_states_close(got, expected(zoo, fn))


@pytest.mark.slow
@pytest.mark.parametrize("with_base", [True, False])
def test_slerp(zoo: Path, tmp_path: Path, with_base: bool) -> None:
    names = EXPERTS[:2]
    r = recipe(zoo, tmp_path / "out", "slerp", {"t": [0.2, 0.8]}, names=names)
    if not with_base:
        del r["base_model"]
    assert run_cli("merge", write_recipe(tmp_path, r), "--quiet").exit_code == 0
    got = load_state(tmp_path / "out")
    base, experts = dense.load_inputs(zoo, names)
    for name, b in base.items():
        match = __import__("re").search(r"\.layers\.(\d+)\.", name)
        pos = int(match.group(1)) / 2 if match else (0.0 if "embed" in name else 1.0)
        t = 0.2 + 0.6 * pos
        if with_base:
            a, c = (e[name].double() - b.double() for e in experts)
            want = b.double() + dense.slerp(a, c, t)
        else:
            want = dense.slerp(experts[0][name].double(), experts[1][name].double(), t)
        torch.testing.assert_close(got[name], want.float(), atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_model_stock(zoo: Path, tmp_path: Path) -> None:
    got = merged(zoo, tmp_path, "model_stock")
    base, experts = dense.load_inputs(zoo)
    want = {}
    for name, b in base.items():
        tvs = dense.task_vectors(base, experts, name)
        cos = [dense.cosine(tvs[i], tvs[j]) for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / len(cos)
        s = 3 * c / (1 + 2 * c)
        want[name] = s * torch.stack([e[name] for e in experts]).mean(0) + (1 - s) * b
    assert_states_close(got, want)


# ---- lines ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lines_over_task_arithmetic(zoo: Path, tmp_path: Path) -> None:
    got = merged(
        zoo, tmp_path, "lines", {"alpha": 0.3, "beta": 0.6, "lambda": 0.5}, {"weight": WEIGHTS}
    )

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        ta = 0.5 * sum(w * tv for w, tv in zip(WEIGHTS, tvs, strict=True))
        return b + dense.layer_scale(name, 3, 0.3, 0.6) * ta

    assert_states_close(got, expected(zoo, fn))


def test_lines_over_model_scope_ties(zoo: Path, tmp_path: Path) -> None:
    params = {"alpha": 0.5, "beta": 0.5, "base_method": "ties", "density": 0.3}
    r = recipe(zoo, tmp_path / "o", "lines", params)
    assert mergecli.plan_merge(recipe_from_dict(r)).passes == 3  # ties' statistics apply
    got = merged(zoo, tmp_path, "lines", params)
    base, experts = dense.load_inputs(zoo)
    kappa = [dense.top_k(c, 0.3) for c in dense.concatenated(base, experts)]

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        trimmed = [tv * (tv.abs() >= k) for tv, k in zip(tvs, kappa, strict=True)]
        return b + dense.layer_scale(name, 3, 0.5, 0.5) * dense.ties_vector(trimmed, [1.0] * 3)

    assert_states_close(got, expected(zoo, fn))


# ---- pcb, tsv ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pcb(zoo: Path, tmp_path: Path) -> None:
    got = merged(zoo, tmp_path, "pcb", {"ratio": 0.2, "lambda": 1.2})
    assert_states_close(got, expected(zoo, lambda n, b, tvs: b + 1.2 * dense.pcb_vector(tvs, 0.2)))


@pytest.mark.slow
def test_tsv(zoo: Path, tmp_path: Path) -> None:
    got = merged(zoo, tmp_path, "tsv", {"alpha": 0.9})
    want = expected(zoo, lambda n, b, tvs: b + 0.9 * dense.tsv_delta(tvs, n))
    # mergecli's SVDs run in float32 (its documented convention), the reference's in float64:
    # they agree to ~1e-5 of the weights (0.1), and the float32 result varies with threads
    assert_states_close(got, want, atol=1e-5)


# ---- consensus -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("use_ties", [False, True])
def test_consensus(zoo: Path, tmp_path: Path, use_ties: bool) -> None:
    lambdas = (0.4, 0.6, 0.5)
    got = merged(
        zoo,
        tmp_path,
        "consensus",
        {"k": 2, "alpha": 1.3, "use_ties": use_ties, "density": 0.4},
        {"lambda": lambdas},
    )
    base, experts = dense.load_inputs(zoo)
    kappa = [dense.top_k(c, 0.4) for c in dense.concatenated(base, experts)]

    def fn(name: str, b: torch.Tensor, tvs: list[torch.Tensor]) -> torch.Tensor:
        if use_ties:
            trimmed = [tv * (tv.abs() >= k) for tv, k in zip(tvs, kappa, strict=True)]
            mtl = dense.ties_vector(trimmed, [1.0] * 3)
        else:
            mtl = sum(tvs)
        masks = dense.tall_masks(tvs, mtl, list(lambdas))
        return b + 1.3 * mtl * (sum(m.int() for m in masks) >= 2)

    assert_states_close(got, expected(zoo, fn))


# ---- whole-model statistics stay bounded -------------------------------------------------------


@pytest.mark.parametrize(("method", "ranks"), [("ties", 1), ("breadcrumbs", 2)])
def test_statistics_state_is_a_fixed_histogram(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, ranks: int
) -> None:
    """Whatever the tensor, the model-scope statistic holds ≤ experts × ranks histograms, each
    with a row per compute thread."""
    held: list[int] = []
    observe = LargestMagnitudes.observe
    lanes = available_cores()

    def spy(self: LargestMagnitudes, inputs: Any) -> None:
        observe(self, inputs)
        held.append(self.state_bytes())
        assert all(h.shape[-1] == BINS and h.numel() <= lanes * BINS for h in self.hist.values())

    monkeypatch.setattr(LargestMagnitudes, "observe", spy)
    plan = mergecli.plan_merge(
        recipe_from_dict(recipe(zoo, tmp_path / "o", method, {"density": 0.3}))
    )
    mergecli.run_merge(plan, tmp_path / "o")
    merged_tensors = sum(t.merge for t in plan.tensors)
    assert len(held) == 2 * merged_tensors  # two passes for float32
    assert max(held) <= len(EXPERTS) * ranks * BINS * 8 * lanes


# ---- recipe validation -----------------------------------------------------------------------


BAD = {
    "della epsilon": ("della", {"epsilon": 0.6}, ["della needs", "epsilon", "models[0]"]),
    "slerp t": ("slerp", {"t": 1.5}, ["t must lie in [0, 1]", "parameters.t"]),
    "breadcrumbs fractions": ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, ["density + gamma"]),
    "pcb ratio": ("pcb", {"ratio": 0}, ["parameters.ratio", "ratio must lie in (0, 1]"]),
    "consensus k": ("consensus", {"k": 4}, ["parameters.k", "0 ≤ k ≤ 3"]),
    "lines alpha": ("lines", {"beta": 1.0}, ["needs 'alpha'"]),
    "lines typo": (
        "lines",
        {"alpha": 1, "beta": 0, "base_method": "tiez"},
        ["base_method", "'ties'"],
    ),
    "lines base param typo": (
        "lines",
        {"alpha": 1, "beta": 0, "base_method": "ties", "densty": 0.2},
        ["has no parameter 'densty'", "did you mean 'density'"],
    ),
    "lines artifact": (
        "lines",
        {"alpha": 1, "beta": 0, "base_method": "emr"},
        ["cannot be wrapped"],
    ),
    "lines clash": ("lines", {"alpha": 1, "beta": 0, "base_method": "tsv"}, ["'alpha' of its own"]),
    "lines of lines": (
        "lines",
        {"alpha": 1, "beta": 0, "base_method": "lines"},
        ["cannot be wrapped"],
    ),
    "slerp three": ("slerp", {}, ["exactly 2 models"]),
    "model_stock one": ("model_stock", {}, ["at least 2 models"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parameters_fail_before_reading(zoo: Path, tmp_path: Path, case: str) -> None:
    method, params, fragments = BAD[case]
    names = {"model_stock one": EXPERTS[:1], "slerp t": EXPERTS[:2]}.get(case, EXPERTS)
    path = write_recipe(tmp_path, recipe(zoo, tmp_path / "out", method, params, names=names))
    result = run_cli("merge", path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_methods_listing_is_complete() -> None:
    result = run_cli("methods", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    wanted = "linear task_arithmetic ties dare_linear dare_ties breadcrumbs breadcrumbs_ties della "
    wanted += "magmax slerp model_stock lines pcb tsv consensus emr tall_masks"
    assert set(wanted.split()) <= set(rows)
    for row in rows.values():
        assert row["summary"] and all(p["help"] for p in row["parameters"]), row["name"]
    assert rows["emr"]["output"] == rows["tall_masks"]["output"] == "task_masks"
    assert rows["slerp"]["max_models"] == 2
    for name in ("ties", "breadcrumbs", "della", "slerp", "model_stock", "pcb", "tsv", "emr"):
        assert rows[name]["convention"], name
    assert rows["lines"]["parameters"][0] == {
        "name": "alpha",
        "default": None,
        "required": True,
        "per_model": False,
        "choices": None,
        "help": "scale α of the first layer and the embeddings",
    }


def test_temporal_folds_composite_methods_and_refuses_artifact_methods(
    zoo: Path, tmp_path: Path
) -> None:
    init = ["temporal", "init", tmp_path / "s", "--base", zoo / "base", "--method"]
    result = run_cli(*init, "emr")
    assert result.exit_code == 2 and "task-mask artifact" in result.output, result.output
    lines = [*init, "lines", "--param", "alpha=0.5", "--param", "beta=0.5"]
    assert run_cli(*lines).exit_code == 0  # lines' weight comes from its base method
    assert run_cli("temporal", "add", tmp_path / "s", zoo / "math", "--quiet").exit_code == 0
