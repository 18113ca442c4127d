"""The methods mergekit has and mergecli added, and mergekit's conventions of the shared ones,
in memory against whole-tensor formulas written here (numpy, float64, independent of the code)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from mergecli.methods import TensorInputs, get_method
from mergecli.methods.inputs import seed_for
from mergecli.methods.registry import SAME
from mergecli.methods.result import as_merged
from tests import dense

RNG = np.random.default_rng(7)
BASE = RNG.normal(size=(6, 10))
TVS = [RNG.normal(scale=s, size=(6, 10)) for s in (0.1, 0.2, 0.05)]


def run(method: str, tvs: list[np.ndarray], conventions: str = "mergecli", **given: Any):
    """The method on float64 inputs, with defaults of the conventions for what is not given."""
    spec = get_method(method)
    p: dict[str, Any] = {"conventions": conventions}
    for param in spec.params:
        value = given.get(param.name, param.default_for(conventions))
        p[param.name] = (
            [value] * len(tvs) if param.per_model and not isinstance(value, list) else value
        )
    inputs = TensorInputs(
        name="model.layers.0.mlp.up_proj.weight",
        base=torch.tensor(BASE),
        expert_weights=[torch.tensor(BASE + tv) for tv in tvs],
        expert_deltas=[None] * len(tvs),
    )
    return as_merged(spec.fn(inputs, p), len(tvs)).value.numpy()


def test_nearswap() -> None:
    b = BASE + TVS[0]
    w = np.clip(0.05 / np.maximum(np.abs(b - BASE), 1e-6), 0, 1)
    np.testing.assert_allclose(run("nearswap", TVS[:1], t=0.05), w * b + (1 - w) * BASE, atol=1e-12)


def test_ramplus_tl_and_ram() -> None:
    tvs = [np.where(np.abs(tv) > 0.08, tv, 0.0) for tv in TVS]
    active = [np.abs(tv) > 1e-5 for tv in tvs]
    n = sum(a.astype(float) for a in active)
    want = BASE + sum(tv * a for tv, a in zip(tvs, active, strict=True)) / np.maximum(n, 1)
    np.testing.assert_allclose(run("ram", tvs), want, atol=1e-12)
    merged = np.zeros_like(BASE)
    for tv, a in zip(tvs, active, strict=True):
        rho = (a & (n > 1)).sum() / max((a & (n == 1)).sum(), 1e-5)
        lam = 1 + 0.3 * min(max(rho, 0), 0.5)
        merged += np.where(n == 1, tv * a * lam, 0) + np.where(n > 1, tv * a / np.maximum(n, 1), 0)
    np.testing.assert_allclose(run("ramplus_tl", tvs, r=0.3, alpha=0.5), BASE + merged, atol=1e-12)


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce(topk: float) -> None:
    x = np.stack(TVS)
    var = x.var(0)
    if topk < 1:
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size)
        keep[np.argsort(-var.reshape(-1))[:k]] = 1
        x = x * keep.reshape(var.shape)
    gamma = np.where(x.sum(0) >= 0, 1, -1)
    eta = (x**2).reshape(3, -1).mean(1)
    eta = eta / eta.sum()
    w = eta[:, None, None] * (np.sign(x) == gamma)
    want = BASE + (x * w).sum(0) / np.maximum(w.sum(0), 1e-6)
    np.testing.assert_allclose(run("sce", TVS, select_topk=topk), want, atol=1e-12)


def test_arcee_fusion() -> None:
    b = BASE + TVS[0]

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(BASE) + 1e-8
    score = np.abs(b - BASE) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(score.reshape(-1))
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    want = BASE + (b - BASE) * (score >= med + 1.5 * (q3 - q1))
    np.testing.assert_allclose(run("arcee_fusion", TVS[:1]), want, atol=1e-12)


def slerp_np(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    omega = math.acos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_nuslerp() -> None:
    t = 3.0 / 4.0
    flat = slerp_np(t, TVS[0].reshape(-1), TVS[1].reshape(-1)).reshape(BASE.shape)
    got = run("nuslerp", TVS[:2], weight=[1.0, 3.0])
    np.testing.assert_allclose(got, BASE + flat, atol=1e-10)
    rows = np.stack([slerp_np(t, a, b) for a, b in zip(TVS[0], TVS[1], strict=True)])
    got = run("nuslerp", TVS[:2], weight=[1.0, 3.0], nuslerp_flatten=False)
    np.testing.assert_allclose(got, BASE + rows, atol=1e-10)
    cols = np.stack([slerp_np(t, a, b) for a, b in zip(TVS[0].T, TVS[1].T, strict=True)]).T
    got = run("nuslerp", TVS[:2], weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    np.testing.assert_allclose(got, BASE + cols, atol=1e-10)


def test_multislerp_two_models_is_slerp_with_mean_norm() -> None:
    """Two unit directions at angle Ω with weights ½: the tangent-space mean is their midpoint
    direction, i.e. slerp at ½, scaled by the mean norm."""
    a, b = TVS[0].reshape(-1), TVS[1].reshape(-1)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    mid = (ua + ub) / np.linalg.norm(ua + ub)
    want = mid * (np.linalg.norm(a) + np.linalg.norm(b)) / 2
    got = run("multislerp", TVS[:2], weight=[1.0, 1.0]) - BASE
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-6)


def test_multislerp_three_models_formula() -> None:
    x = np.stack([tv.reshape(-1) for tv in TVS])
    w = np.array([1.0, 2.0, 1.0]) / 4
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + 1e-8)
    m = (u * w[:, None]).sum(0)
    m /= np.linalg.norm(m)
    tangent = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    length = np.linalg.norm(tangent) + 1e-8
    want = (m * np.cos(length) + tangent * np.sin(length) / length) * (norms * w).sum()
    got = run("multislerp", TVS, weight=[1.0, 2.0, 1.0]) - BASE
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-10)


def test_karcher_mean_is_the_fixed_point() -> None:
    """At the Karcher mean μ the mean log map vanishes: Σ θt/sin θt (ut − cos θt μ) ≈ 0, and
    the result is μ scaled by the mean norm of the models."""
    models = [(BASE + tv).reshape(-1) for tv in TVS]
    got = run("karcher", TVS, max_iter=100, tol=1e-12).reshape(-1)
    mu = got / np.linalg.norm(got)
    log_sum = np.zeros_like(mu)
    for x in models:
        u = x / np.linalg.norm(x)
        c = np.clip(u @ mu, -1, 1)
        theta = math.acos(c)
        log_sum += theta / math.sin(theta) * (u - c * mu)
    assert np.linalg.norm(log_sum) < 1e-9
    assert np.linalg.norm(got) == pytest.approx(np.mean([np.linalg.norm(x) for x in models]))


def test_mergekit_ties_weighted_election_and_floor_k() -> None:
    weights = [1.0, 0.5, 2.0]
    out = np.zeros_like(BASE)
    trimmed = []
    for tv in TVS:
        k = max(1, int(0.3 * tv.size))
        keep = np.zeros(tv.size)
        keep[np.argsort(-np.abs(tv).reshape(-1))[:k]] = 1
        trimmed.append(tv * keep.reshape(tv.shape))
    weighted = np.stack([w * x for w, x in zip(weights, trimmed, strict=True)])
    gamma = np.where(weighted.sum(0) >= 0, 1, -1)
    agree = np.sign(weighted) == gamma
    divisor = (np.array(weights)[:, None, None] * agree).sum(0)
    out = (weighted * agree).sum(0) / np.where(divisor == 0, 1, divisor)
    got = run("ties", TVS, "mergekit", weight=weights, density=0.3)
    np.testing.assert_allclose(got, BASE + out, atol=1e-12)


def test_mergekit_breadcrumbs_ranks_and_l1_rescale() -> None:
    density, gamma = 0.5, 0.1
    parts = []
    for tv in TVS:
        n = tv.size
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        keep = np.zeros(n)
        keep[np.argsort(np.abs(tv).reshape(-1))[bottom : bottom + target]] = 1
        kept = tv * keep.reshape(tv.shape)
        parts.append(kept * np.abs(tv).sum() / np.abs(kept).sum())
    got = run("breadcrumbs", TVS, "mergekit", density=density, gamma=gamma, rescale=True)
    np.testing.assert_allclose(got, BASE + sum(parts), atol=1e-12)


def test_mergekit_dare_keeps_the_l1_norm() -> None:
    got = run("dare_linear", TVS[:1], "mergekit", density=0.5) - BASE
    assert np.abs(got).sum() == pytest.approx(np.abs(TVS[0]).sum(), rel=1e-12)
    kept = got != 0
    np.testing.assert_allclose(
        got[kept] / TVS[0][kept], np.full(kept.sum(), got[kept][0] / TVS[0][kept][0])
    )


def _torch_uniform(t: int) -> np.ndarray:
    """mergekit-convention masks (unchanged by the Philox masks of mergecli's convention):
    float64 uniforms of a CPU torch generator seeded by (recipe seed 0, expert, tensor name)."""
    gen = torch.Generator().manual_seed(seed_for(0, t, "model.layers.0.mlp.up_proj.weight"))
    return torch.rand(BASE.shape, generator=gen, dtype=torch.float64).numpy()


def test_mergekit_dare_and_della_masks_are_torch_generator_draws() -> None:
    masks = [_torch_uniform(t) < 0.4 for t in range(3)]
    want = BASE + sum(tv * m for tv, m in zip(TVS, masks, strict=True))
    got = run("dare_linear", TVS, "mergekit", density=0.4, rescale=False, normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-12)
    keep = [dense.della_keep(torch.tensor(tv), 0.5, 0.2).numpy() for tv in TVS]
    masks = [_torch_uniform(t) < k for t, k in enumerate(keep)]
    want = BASE + sum(tv * m for tv, m in zip(TVS, masks, strict=True))
    got = run("della_linear", TVS, "mergekit", density=0.5, epsilon=0.2, rescale=False)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_mergekit_model_stock_filter_wise() -> None:
    x = np.stack(TVS)
    cos = []
    for i in range(3):
        for j in range(i + 1, 3):
            num = (x[i] * x[j]).sum(-1)
            cos.append(num / (np.linalg.norm(x[i], axis=-1) * np.linalg.norm(x[j], axis=-1)))
    c = np.mean(cos, axis=0)[:, None]
    s = 3 * c / (1 + 2 * c)
    want = BASE + s * x.mean(0)
    for conventions in ("mergecli", "mergekit"):
        got = run("model_stock", TVS, conventions, filter_wise=True)
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_every_mergekit_default_is_mergekit_0_1_5s() -> None:
    """The differing defaults, as mergekit 0.1.5's registry states them."""
    want = {
        ("ties", "density"): 1.0,
        ("ties", "scope"): "tensor",
        ("dare_linear", "density"): 1.0,
        ("dare_ties", "density"): 1.0,
        ("dare_ties", "normalize"): False,
        ("breadcrumbs", "density"): 1.0,
        ("breadcrumbs", "scope"): "tensor",
        ("breadcrumbs_ties", "density"): 1.0,
        ("breadcrumbs_ties", "normalize"): False,
        ("breadcrumbs_ties", "scope"): "tensor",
        ("della", "density"): 1.0,
        ("della", "epsilon"): 0.15,
        ("della_linear", "density"): 1.0,
        ("della_linear", "epsilon"): 0.15,
    }
    from mergecli.methods import list_methods

    got = {
        (m.name, p.name): p.mergekit
        for m in list_methods()
        for p in m.params
        if p.mergekit is not SAME
    }
    assert got == want
