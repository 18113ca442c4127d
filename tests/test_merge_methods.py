"""Each foundation method against a dense, whole-tensor computation of its METHODS.md formula."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tests.conftest import EXPERTS
from tests.dense import philox_uniform
from tests.helpers import load_state, run_cli, write_recipe

WEIGHTS = (1.0, 0.5, 2.0)
DENSITIES = (0.2, 0.35, 0.5)


def dense_inputs(zoo: Path) -> tuple[dict, list[dict]]:
    base = {k: v.float() for k, v in load_state(zoo / "base").items()}
    experts = [{k: v.float() for k, v in load_state(zoo / n).items()} for n in EXPERTS]
    return base, experts


def trim(tv: torch.Tensor, kappa: float) -> torch.Tensor:
    return torch.where(tv.abs() >= kappa, tv, torch.zeros_like(tv))


def kth_largest(values: torch.Tensor, density: float) -> float:
    n = values.numel()
    k = math.ceil(round(density * n, 9))
    return torch.kthvalue(values.abs().flatten(), n - k + 1).values.item()


def ties_combine(tvs: list[torch.Tensor], weights, lam: float, base: torch.Tensor) -> torch.Tensor:
    gamma = torch.sign(sum(tvs))
    gamma[gamma == 0] = 1
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for tv, w in zip(tvs, weights, strict=True):
        sel = ((tv != 0) & (torch.sign(tv) == gamma)).float()
        num += w * tv * sel
        den += w * sel
    merged = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return base + lam * merged


def expected_state(method: str, zoo: Path) -> dict[str, torch.Tensor]:
    base, experts = dense_inputs(zoo)
    out = {}
    if method == "ties_model":  # thresholds over the concatenation of all tensors
        cat = [torch.cat([(e[k] - base[k]).flatten() for k in sorted(base)]) for e in experts]
        kappas = [kth_largest(c, d) for c, d in zip(cat, DENSITIES, strict=True)]
    for name, b in base.items():
        tvs = [e[name] - b for e in experts]
        if method == "linear":
            out[name] = sum(w * e[name] for w, e in zip(WEIGHTS, experts, strict=True)) / sum(
                WEIGHTS
            )
        elif method == "task_arithmetic":
            out[name] = b + 0.7 * sum(w * tv for w, tv in zip(WEIGHTS, tvs, strict=True))
        elif method == "ties_tensor":
            trimmed = [trim(tv, kth_largest(tv, d)) for tv, d in zip(tvs, DENSITIES, strict=True)]
            out[name] = ties_combine(trimmed, WEIGHTS, 0.9, b)
        elif method == "ties_model":
            trimmed = [trim(tv, k) for tv, k in zip(tvs, kappas, strict=True)]
            out[name] = ties_combine(trimmed, WEIGHTS, 0.9, b)
    return out


RECIPES = {
    "linear": ("linear", {}, {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, {}),
    "ties_tensor": ("ties", {"lambda": 0.9, "scope": "tensor"}, {"density": DENSITIES}),
    "ties_model": ("ties", {"lambda": 0.9}, {"density": DENSITIES}),
}


def merge_recipe(zoo: Path, method: str, params: dict, per_model: dict, out: Path, **extra) -> Path:
    models = []
    for i, name in enumerate(EXPERTS):
        p = {"weight": WEIGHTS[i], **{k: v[i] for k, v in per_model.items()}}
        models.append({"model": str(zoo / name), "parameters": p})
    recipe = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": models,
        "parameters": params,
        "output": str(out),
        **extra,
    }
    return write_recipe(out.parent, recipe, f"{out.name}.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RECIPES))
def test_method_matches_dense_formula_float32(zoo: Path, tmp_path: Path, case: str) -> None:
    method, params, per_model = RECIPES[case]
    recipe = merge_recipe(zoo, method, params, per_model, tmp_path / "out")
    result = run_cli("merge", recipe, "--shard-size", "30KB", "--quiet")
    assert result.exit_code == 0, result.output
    got = load_state(tmp_path / "out")
    want = expected_state(case, zoo)
    assert set(got) == set(want)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["task_arithmetic", "ties_model"])
def test_bfloat16_inputs_compute_in_float32(zoo_bf16: Path, tmp_path: Path, case: str) -> None:
    method, params, per_model = RECIPES[case]
    recipe = merge_recipe(zoo_bf16, method, params, per_model, tmp_path / "out")
    assert run_cli("merge", recipe, "--quiet").exit_code == 0
    got = load_state(tmp_path / "out")
    want = expected_state(case, zoo_bf16)
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_output_loads_and_gives_the_expected_logits(zoo: Path, tmp_path: Path) -> None:
    method, params, per_model = RECIPES["ties_model"]
    recipe = merge_recipe(zoo, method, params, per_model, tmp_path / "out")
    assert run_cli("merge", recipe, "--shard-size", "30KB", "--quiet").exit_code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = LlamaForCausalLM(merged.config)
    reference.load_state_dict(expected_state("ties_model", zoo))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def single_expert_dare(zoo: Path, tmp_path: Path, name: str, density: float, seed: int) -> Path:
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "dare_linear",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / "math")}],
            "parameters": {"density": density},
            "seed": seed,
            "output": str(tmp_path / name),
        },
        f"{name}.yaml",
    )
    assert run_cli("merge", recipe, "--quiet").exit_code == 0
    return tmp_path / name


@pytest.mark.slow
def test_dare_reruns_are_byte_identical_across_thread_counts(zoo: Path, tmp_path: Path) -> None:
    outs = []
    before = torch.get_num_threads()
    try:
        for i, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            recipe = merge_recipe(
                zoo, "dare_ties", {"density": 0.3}, {}, tmp_path / f"o{i}", seed=7
            )
            assert run_cli("merge", recipe, "--quiet").exit_code == 0
            outs.append((tmp_path / f"o{i}" / "model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]


def test_dare_keeps_density_and_preserves_the_mean(zoo: Path, tmp_path: Path) -> None:
    density = 0.3
    base, experts = dense_inputs(zoo)
    got = load_state(single_expert_dare(zoo, tmp_path, "one", density, seed=7))
    tv = torch.cat([(experts[0][k] - base[k]).flatten() for k in sorted(base)])
    one = torch.cat([(got[k] - base[k]).flatten() for k in sorted(base)])
    nonzero = tv != 0
    n = int(nonzero.sum())
    kept = int(((one != 0) & nonzero).sum()) / n
    assert abs(kept - density) < 3 * math.sqrt(density * (1 - density) / n)
    torch.testing.assert_close(one[one != 0], tv[one != 0] / density, atol=1e-6, rtol=0)
    sigma = math.sqrt(float((tv.double() ** 2).sum()) * (1 - density) / density)
    assert abs(float(one.double().sum() - tv.double().sum())) < 3 * sigma
    other = load_state(single_expert_dare(zoo, tmp_path, "other", density, seed=8))
    assert not all(torch.equal(other[k], got[k]) for k in got)


def test_dare_ties_uses_seeded_masks_then_election(zoo: Path, tmp_path: Path) -> None:
    from mergecli.methods.inputs import seed_for

    recipe = merge_recipe(zoo, "dare_ties", {"density": 0.6}, {}, tmp_path / "out", seed=3)
    assert run_cli("merge", recipe, "--quiet").exit_code == 0
    got = load_state(tmp_path / "out")
    base, experts = dense_inputs(zoo)
    for name, b in base.items():
        dropped = []
        for t, e in enumerate(experts):
            mask = philox_uniform(seed_for(3, t, name), b.shape) < 0.6
            dropped.append((e[name] - b) * mask / 0.6)
        want = ties_combine(dropped, WEIGHTS, 1.0, b)
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)
