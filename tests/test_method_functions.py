"""Every registered method function on one tensor in memory, against tests/dense.py or the
METHODS.md formula written out here: no files, no CLI, milliseconds per test.

``call`` is the only place that knows how a method function is called and what it returns.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mergecli.errors import RecipeError
from mergecli.methods import get_method, list_methods
from mergecli.methods.emr import RESCALERS
from mergecli.methods.inputs import TensorInputs, seed_for
from mergecli.methods.result import as_merged
from mergecli.methods.statistics import StatValues
from mergecli.methods.task_masks import TaskMasks
from mergecli.methods.ties import THRESHOLDS
from tests import dense

NAME = "model.layers.1.mlp.up_proj.weight"
LAYERS = 4
WEIGHTS = [1.0, 0.5, 2.0]
SEED = 7


def tensors(
    shape: tuple[int, ...] = (8, 6), experts: int = 3, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random base and experts = base + noise of a different scale each (float32)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + (0.1 + t) * torch.randn(shape, generator=gen) for t in range(experts)]


def call(
    method: str,
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    stats: dict | None = None,
    name: str = NAME,
    **params: object,
) -> torch.Tensor | TaskMasks:
    """The method function's result for one tensor; ``params`` as in a recipe's global
    ``parameters`` (a list for a per-model value), the rest from the method's defaults."""
    spec = get_method(method).resolve(params)
    unknown = set(params) - set(spec.param_names)
    assert not unknown, unknown
    resolved: dict[str, object] = {}
    for param in spec.params:
        value = params.get(param.name, param.default)
        if param.per_model and not isinstance(value, list):
            value = [value] * len(experts)
        key = f"parameters.{param.name}"
        if isinstance(value, list):
            resolved[param.name] = [param.coerce(v, key) for v in value]
        else:
            resolved[param.name] = param.coerce(value, key)
    resolved["conventions"] = params.get("conventions", "mergecli")
    if spec.check is not None:
        spec.check(resolved, name)
    inputs = TensorInputs(
        name=name,
        base=None if base is None else base.clone(),
        expert_weights=[e.clone() for e in experts],
        expert_deltas=[None] * len(experts),
        seed=SEED,
        num_layers=LAYERS,
        stats=StatValues(stats or {}),
    )
    return as_merged(spec.fn(inputs, resolved), len(experts)).value


def close(got: object, want: torch.Tensor, atol: float = 1e-6) -> None:
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def uniform(t: int, shape: torch.Size, name: str = NAME) -> torch.Tensor:
    """The uniform draws behind expert t's random mask (mergecli's convention: Philox4x32-10
    keyed by the recipe seed, the expert's index and the tensor's name, one per entry)."""
    return dense.philox_uniform(seed_for(SEED, t, name), shape)


def trim(tv: torch.Tensor, density: float) -> torch.Tensor:
    return tv * (tv.abs() >= dense.top_k(tv, density))


# ---- averaging and task arithmetic ------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize: bool) -> None:
    base, experts = tensors()
    total = sum(w * e for w, e in zip(WEIGHTS, experts, strict=True))
    want = total / sum(WEIGHTS) if normalize else total
    close(call("linear", base, experts, weight=WEIGHTS, normalize=normalize), want)
    close(call("linear", None, experts, weight=WEIGHTS, normalize=normalize), want)


def test_linear_refuses_weights_that_sum_to_zero() -> None:
    base, experts = tensors(experts=2)
    with pytest.raises(RecipeError) as caught:
        call("linear", base, experts, weight=[1.0, -1.0])
    assert caught.value.key == "parameters.weight"


def test_passthrough_copies_its_one_model_scaled() -> None:
    base, experts = tensors(experts=1)
    close(call("passthrough", None, experts), experts[0])
    close(call("passthrough", base, experts, scale=[0.5]), 0.5 * experts[0])


def test_greedy_soup_averages_the_experts_it_is_given() -> None:
    base, experts = tensors()
    close(call("greedy_soup", base, experts), sum(experts) / len(experts))


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic(normalize: bool) -> None:
    base, experts = tensors()
    tvs = [e - base for e in experts]
    total = sum(w * tv for w, tv in zip(WEIGHTS, tvs, strict=True))
    if normalize:
        total = total / sum(WEIGHTS)
    got = call(
        "task_arithmetic", base, experts, weight=WEIGHTS, normalize=normalize, **{"lambda": 0.7}
    )
    close(got, base + 0.7 * total)


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear(rescale: bool) -> None:
    base, experts = tensors()
    density = [0.3, 0.5, 0.8]
    dropped = []
    for t, e in enumerate(experts):
        kept = (e - base) * (uniform(t, base.shape) < density[t])
        dropped.append(kept / density[t] if rescale else kept)
    want = base + 1.5 * sum(w * d for w, d in zip(WEIGHTS, dropped, strict=True))
    got = call(
        "dare_linear", base, experts, weight=WEIGHTS, density=density, rescale=rescale,
        **{"lambda": 1.5},
    )  # fmt: skip
    close(got, want)


# ---- TIES family ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("merge_func", "sign", "normalize"),
    [("mean", "mass", True), ("sum", "mass", True), ("max", "mass", True),
     ("mean", "count", True), ("mean", "mass", False)],
)  # fmt: skip
def test_ties_tensor_scope(merge_func: str, sign: str, normalize: bool) -> None:
    base, experts = tensors()
    density = [0.2, 0.5, 0.9]
    trimmed = [trim(e - base, d) for e, d in zip(experts, density, strict=True)]
    func = "sum" if merge_func == "mean" and not normalize else merge_func
    want = base + 0.9 * dense.ties_vector(trimmed, WEIGHTS, func, sign)
    got = call(
        "ties", base, experts, weight=WEIGHTS, density=density, scope="tensor",
        merge_func=merge_func, sign=sign, normalize=normalize, **{"lambda": 0.9},
    )  # fmt: skip
    close(got, want)


def test_ties_model_scope_uses_the_given_thresholds() -> None:
    base, experts = tensors()
    kappa = [0.05, 0.5, 1.0]
    trimmed = [(e - base) * ((e - base).abs() >= k) for e, k in zip(experts, kappa, strict=True)]
    got = call("ties", base, experts, {THRESHOLDS: kappa}, weight=WEIGHTS)
    close(got, base + dense.ties_vector(trimmed, WEIGHTS))


def test_ties_row_blocks_equal_the_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergecli.methods import ties

    base, experts = tensors((9, 7))
    whole = call("ties", base, experts, weight=WEIGHTS, density=0.4, scope="tensor")
    monkeypatch.setattr(ties, "BLOCK_ELEMENTS", 10)
    blocks = call("ties", base, experts, weight=WEIGHTS, density=0.4, scope="tensor")
    assert isinstance(whole, torch.Tensor) and isinstance(blocks, torch.Tensor)
    assert torch.equal(whole, blocks)
    trimmed = [trim(e - base, 0.4) for e in experts]
    close(blocks, base + dense.ties_vector(trimmed, WEIGHTS))


def test_dare_ties() -> None:
    base, experts = tensors()
    density = [0.3, 0.5, 0.8]
    dropped = [
        (e - base) * (uniform(t, base.shape) < density[t]) / density[t]
        for t, e in enumerate(experts)
    ]
    got = call("dare_ties", base, experts, weight=WEIGHTS, density=density)
    close(got, base + dense.ties_vector(dropped, WEIGHTS))


@pytest.mark.parametrize("normalize", [True, False])
def test_breadcrumbs_tensor_scope(normalize: bool) -> None:
    base, experts = tensors()
    density, gamma = [0.5, 0.7, 0.9], [0.1, 0.05, 0.0]
    kept = [
        dense.rank_window(e - base, d, g) for e, d, g in zip(experts, density, gamma, strict=True)
    ]
    total = sum(w * k for w, k in zip(WEIGHTS, kept, strict=True))
    if normalize:
        total = total / sum(WEIGHTS)
    got = call(
        "breadcrumbs", base, experts, weight=WEIGHTS, density=density, gamma=gamma,
        scope="tensor", normalize=normalize, **{"lambda": 1.2},
    )  # fmt: skip
    close(got, base + 1.2 * total)


def test_breadcrumbs_ties_tensor_scope() -> None:
    base, experts = tensors()
    kept = [dense.rank_window(e - base, 0.6, 0.1) for e in experts]
    got = call(
        "breadcrumbs_ties", base, experts, weight=WEIGHTS, density=0.6, gamma=0.1, scope="tensor"
    )
    close(got, base + dense.ties_vector(kept, WEIGHTS))


def test_breadcrumbs_refuses_density_plus_gamma_above_one() -> None:
    base, experts = tensors()
    with pytest.raises(RecipeError) as caught:
        call("breadcrumbs", base, experts, density=[0.9, 0.9, 0.95], gamma=0.1, scope="tensor")
    assert caught.value.key == "models[2].parameters"


@pytest.mark.parametrize("normalize", [True, False])
def test_della(normalize: bool) -> None:
    base, experts = tensors()
    density, epsilon = [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    dropped = []
    for t, e in enumerate(experts):
        tv = e - base
        keep = dense.della_keep(tv, density[t], epsilon[t])
        dropped.append(tv * (uniform(t, base.shape) < keep) / keep.float())
    func = "mean" if normalize else "sum"
    want = base + 0.8 * dense.ties_vector(dropped, WEIGHTS, func)
    got = call(
        "della", base, experts, weight=WEIGHTS, density=density, epsilon=epsilon,
        normalize=normalize, **{"lambda": 0.8},
    )  # fmt: skip
    close(got, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_della_linear(normalize: bool) -> None:
    base, experts = tensors()
    density, epsilon = [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    total = torch.zeros_like(base)
    for t, e in enumerate(experts):
        tv = e - base
        keep = dense.della_keep(tv, density[t], epsilon[t])
        total += WEIGHTS[t] * tv * (uniform(t, base.shape) < keep) / keep.float()
    if normalize:
        total /= sum(WEIGHTS)
    got = call(
        "della_linear", base, experts, weight=WEIGHTS, density=density, epsilon=epsilon,
        normalize=normalize, **{"lambda": 0.8},
    )  # fmt: skip
    close(got, base + 0.8 * total)


def test_della_refuses_probabilities_outside_zero_one() -> None:
    base, experts = tensors()
    with pytest.raises(RecipeError) as caught:
        call("della", base, experts, density=0.5, epsilon=[0.1, 0.5, 0.1])
    assert caught.value.key == "models[1].parameters"


# ---- other single-model methods ---------------------------------------------------------------


def test_magmax_takes_the_largest_magnitude_first_expert_on_ties() -> None:
    base, experts = tensors()
    experts[2][0, 0] = base[0, 0] - (experts[0][0, 0] - base[0, 0])  # |τ3| = |τ1| there
    tvs = [e - base for e in experts]
    want = base.clone()
    for index in torch.cartesian_prod(torch.arange(8), torch.arange(6)).tolist():
        values = [tv[tuple(index)].item() for tv in tvs]
        best = max(range(3), key=lambda t: (abs(values[t]), -t))
        want[tuple(index)] += 0.5 * values[best]
    close(call("magmax", base, experts, **{"lambda": 0.5}), want)


@pytest.mark.parametrize("with_base", [True, False])
def test_slerp(with_base: bool) -> None:
    base, experts = tensors(experts=2)
    if with_base:
        a, b = (e - base for e in experts)
        want = base + dense.slerp(a, b, 0.3)
    else:
        want = dense.slerp(experts[0], experts[1], 0.3)
    close(call("slerp", base if with_base else None, experts, t=0.3), want, atol=1e-5)


def test_slerp_of_parallel_vectors_is_linear() -> None:
    a = torch.linspace(-1, 1, 12).reshape(3, 4)
    got = call("slerp", None, [a, 2 * a], t=0.25)
    close(got, 0.75 * a + 0.25 * (2 * a))
    with pytest.raises(RecipeError) as caught:
        call("slerp", None, [a, 2 * a], t=1.5)
    assert caught.value.key == "parameters.t"


def test_model_stock() -> None:
    base, experts = tensors(experts=4)
    tvs = [e - base for e in experts]
    m = len(tvs)
    pairs = [(s, t) for s in range(m) for t in range(s + 1, m)]
    c = sum(dense.cosine(tvs[s], tvs[t]) for s, t in pairs) / len(pairs)
    ratio = m * c / (1 + (m - 1) * c)
    mean = sum(experts) / m
    close(call("model_stock", base, experts), ratio * mean + (1 - ratio) * base, atol=1e-5)


@pytest.mark.parametrize(
    "name", [NAME, "model.embed_tokens.weight", "model.norm.weight", "model.layers.3.x.weight"]
)
def test_lines_over_task_arithmetic(name: str) -> None:
    base, experts = tensors()
    scale = dense.layer_scale(name, LAYERS, 0.3, 0.6)
    tvs = [e - base for e in experts]
    want = base + scale * sum(w * tv for w, tv in zip(WEIGHTS, tvs, strict=True))
    got = call("lines", base, experts, name=name, alpha=0.3, beta=0.6, weight=WEIGHTS)
    close(got, want, atol=1e-5)


def test_lines_over_ties() -> None:
    base, experts = tensors()
    trimmed = [trim(e - base, 0.5) for e in experts]
    want = base + (0.2 + 0.4 / (LAYERS - 1)) * dense.ties_vector(trimmed, [1.0] * 3)
    got = call(
        "lines", base, experts, alpha=0.2, beta=0.4, base_method="ties", density=0.5,
        scope="tensor",
    )  # fmt: skip
    close(got, want)


def test_pcb() -> None:
    base, experts = tensors((40, 30))
    tvs = [e - base for e in experts]
    got = call("pcb", base, experts, ratio=0.3, **{"lambda": 1.1})
    close(got, base + 1.1 * dense.pcb_vector(tvs, 0.3), atol=1e-5)


@pytest.mark.parametrize("name", [NAME, "model.embed_tokens.weight", "lm_head.weight"])
def test_tsv(name: str) -> None:
    base, experts = tensors((10, 7))
    tvs = [e - base for e in experts]
    got = call("tsv", base, experts, name=name, alpha=0.9)
    close(got, base + 0.9 * dense.tsv_delta(tvs, name), atol=1e-5)


def test_tsv_averages_one_dimensional_tensors() -> None:
    base, experts = tensors((12,))
    tvs = [e - base for e in experts]
    close(call("tsv", base, experts, name="model.norm.weight"), base + sum(tvs) / 3)


# ---- TALL masks, consensus, EMR ---------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus(k: int) -> None:
    base, experts = tensors()
    tvs = [e - base for e in experts]
    lam = [0.4, 0.6, 0.8]
    mtl = sum(tvs)
    masks = dense.tall_masks(tvs, mtl, lam)
    keep = torch.stack(masks).sum(0) >= k
    got = call("consensus", base, experts, k=k, alpha=0.7, **{"lambda": lam})
    close(got, base + 0.7 * mtl * keep)


def test_consensus_over_ties() -> None:
    base, experts = tensors()
    tvs = [e - base for e in experts]
    mtl = dense.ties_vector([trim(tv, 0.3) for tv in tvs], [1.0] * 3)
    keep = torch.stack(dense.tall_masks(tvs, mtl, [0.6] * 3)).sum(0) >= 2
    got = call("consensus", base, experts, use_ties=True, density=0.3, scope="tensor")
    close(got, base + mtl * keep)


def test_consensus_refuses_k_above_the_number_of_experts() -> None:
    base, experts = tensors()
    with pytest.raises(RecipeError) as caught:
        call("consensus", base, experts, k=4)
    assert caught.value.key == "parameters.k"


def test_tall_masks() -> None:
    base, experts = tensors()
    tvs = [e - base for e in experts]
    got = call("tall_masks", base, experts, **{"lambda": [0.5, 0.6, 0.7]})
    assert isinstance(got, TaskMasks)
    close(got.unified, sum(tvs))
    want = dense.tall_masks(tvs, sum(tvs), [0.5, 0.6, 0.7])
    assert [m.tolist() for m in got.masks] == [m.tolist() for m in want]


def test_emr_unified_vector_and_masks() -> None:
    base, experts = tensors()
    base[0, 0] = 0.0
    for e, value in zip(experts, (1.0, -1.0, 0.0), strict=True):
        e[0, 0] = value  # Σ τ = 0 there, which elects −1
    got = call("emr", base, experts, {RESCALERS: [1.5, 2.0, 0.5]})
    assert isinstance(got, TaskMasks)
    unified, masks = dense.emr_parts([e - base for e in experts])
    close(got.unified, unified)
    assert [m.tolist() for m in got.masks] == [m.tolist() for m in masks]
    assert got.masks[1][0, 0] and not got.masks[0][0, 0]
    assert got.scales == [1.5, 2.0, 0.5]


def test_every_method_has_a_test_here() -> None:
    here = [*globals(), *vars(importlib.import_module("tests.test_mergekit_methods"))]
    tested = [name.removeprefix("test_") for name in here if name.startswith("test_")]
    missing = [m.name for m in list_methods() if not any(t.startswith(m.name) for t in tested)]
    assert not missing, f"methods without an in-memory test: {missing}"
