"""Dense, whole-tensor reference implementations of the METHODS.md formulas (tests only).

Written independently of mergecli's code: whole tensors and whole concatenated task vectors in
memory, straightforward torch, float64 where the spec accumulates in float64.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from tests.conftest import EXPERTS
from tests.helpers import load_state

State = dict[str, torch.Tensor]


def load_inputs(zoo: Path, names: tuple[str, ...] = EXPERTS) -> tuple[State, list[State]]:
    """The base and the experts of a zoo, every tensor in float32."""
    base = {k: v.float() for k, v in load_state(zoo / "base").items()}
    experts = [{k: v.float() for k, v in load_state(zoo / n).items()} for n in names]
    return base, experts


def task_vectors(base: State, experts: list[State], name: str) -> list[torch.Tensor]:
    return [e[name] - base[name] for e in experts]


def concatenated(base: State, experts: list[State]) -> list[torch.Tensor]:
    """Each expert's whole task vector, flattened and concatenated in sorted tensor order."""
    return [torch.cat([(e[k] - base[k]).flatten() for k in sorted(base)]) for e in experts]


def split(whole: torch.Tensor, base: State) -> State:
    """The inverse of ``concatenated`` for one flat vector."""
    out, start = {}, 0
    for k in sorted(base):
        n = base[k].numel()
        out[k] = whole[start : start + n].reshape(base[k].shape)
        start += n
    return out


def kth_largest(values: torch.Tensor, k: int) -> float:
    """torch.kthvalue from the top (k ≥ 1)."""
    return torch.kthvalue(values.abs().flatten(), values.numel() - k + 1).values.item()


def top_k(values: torch.Tensor, density: float) -> float:
    """TIES threshold: the ceil(density·n)-th largest magnitude."""
    return kth_largest(values, math.ceil(round(density * values.numel(), 9)))


def rank_window(tv: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs by explicit ranks: keep ranks in (⌊γn⌋, ⌊(γ+density)n⌋] by descending abs."""
    n = tv.numel()
    lo = math.floor(round(gamma * n, 9))
    hi = math.floor(round((gamma + density) * n, 9))
    order = torch.argsort(tv.abs().flatten(), descending=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[lo:hi]] = True
    return tv * keep.reshape(tv.shape)


def ties_vector(
    trimmed: list[torch.Tensor], weights: list[float], merge_func: str = "mean", sign: str = "mass"
) -> torch.Tensor:
    """Sign election (0 → +1) and disjoint merge of already trimmed task vectors."""
    stacked = torch.stack(trimmed)
    votes = stacked.sum(0) if sign == "mass" else torch.sign(stacked).sum(0)
    gamma = torch.where(votes >= 0, 1.0, -1.0)
    agree = (stacked != 0) & (torch.sign(stacked) == gamma)
    w = torch.tensor(weights).reshape(-1, *[1] * trimmed[0].dim())
    if merge_func == "max":
        return gamma * (stacked.abs() * agree).amax(0)
    total = (stacked * agree * w).sum(0)
    if merge_func == "sum":
        return total
    count = (agree * w).sum(0)
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def layer_scale(name: str, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS: α + β·l/(L−1) in layer l; α for embeddings; α + β after the layers."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return alpha + beta * int(match.group(1)) / (num_layers - 1)
    return alpha if "embed" in name else alpha + beta


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom else 0.0


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    c = cosine(a, b)
    if abs(c) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(c)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def della_keep(tv: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities per row (first dimension) from the ascending magnitude rank."""
    rows = tv.reshape(tv.shape[0], -1) if tv.dim() > 1 else tv.reshape(1, -1)
    n = rows.shape[1]
    ranks = torch.zeros(rows.shape, dtype=torch.float64)
    for i, row in enumerate(rows):
        ranks[i, torch.argsort(row.abs(), stable=True)] = torch.arange(n, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * ranks / (n - 1)).reshape(tv.shape)


def pcb_vector(tvs: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """PCB on one tensor: rows are the tasks' flattened task vectors."""
    x = torch.stack([tv.flatten() for tv in tvs])
    m, n = x.shape

    def clamp_at(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        # kthvalue is 1-based: position i of the ascending sort is the (i+1)-th smallest
        low = torch.kthvalue(v, lo + 1, dim=1, keepdim=True).values
        high = torch.kthvalue(v, hi + 1, dim=1, keepdim=True).values
        return torch.minimum(torch.maximum(v, low), high)

    def minmax(v: torch.Tensor) -> torch.Tensor:
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        return torch.nan_to_num((v - lo) / (hi - lo), nan=0.0)

    magnitude = clamp_at(x.abs(), int(n * 1e-4), int(n * (1 - 1e-4) - 1))
    beta = torch.exp(m * minmax(magnitude) ** 2) * torch.tanh(x * x.sum(0))
    weight = minmax(clamp_at(beta, int(n * (1 - ratio)), n - 1))
    clipped = torch.sign(x) * magnitude
    merged = (clipped * weight).sum(0) / weight.sum(0).clamp_min(1e-12)
    return merged.reshape(tvs[0].shape)


def polar(x: torch.Tensor) -> torch.Tensor:
    """x (xᵀx)^(-1/2), the orthogonal polar factor of a full-column-rank x (float64)."""
    values, vectors = torch.linalg.eigh(x.T @ x)
    return x @ vectors @ torch.diag(values.rsqrt()) @ vectors.T


def tsv_delta(tvs: list[torch.Tensor], name: str) -> torch.Tensor:
    m = len(tvs)
    if tvs[0].dim() != 2 or "embed" in name or "lm_head" in name:
        return torch.stack(tvs).mean(0)
    k = min(tvs[0].shape) // m
    svds = [torch.linalg.svd(tv.double(), full_matrices=False) for tv in tvs]
    u = torch.cat([s.U[:, :k] for s in svds], dim=1)
    s = torch.cat([s.S[:k] for s in svds])
    v = torch.cat([s.Vh[:k].T for s in svds], dim=1)
    return (polar(u) @ torch.diag(s) @ polar(v).T).float()


def tall_masks(tvs: list[torch.Tensor], mtl: torch.Tensor, lam: list[float]) -> list[torch.Tensor]:
    return [tv.abs() > lt * (mtl - tv).abs() for tv, lt in zip(tvs, lam, strict=True)]


def emr_parts(tvs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    total = torch.stack(tvs).sum(0)
    gamma = torch.where(total > 0, 1.0, -1.0)
    masks = [tv * gamma > 0 for tv in tvs]
    unified = gamma * torch.stack(
        [(tv * mk).abs() for tv, mk in zip(tvs, masks, strict=True)]
    ).amax(0)
    return unified, masks


def emr_rescalers(base: State, experts: list[State]) -> list[float]:
    num, den = [0.0] * len(experts), [0.0] * len(experts)
    for name in base:
        tvs = task_vectors(base, experts, name)
        unified, masks = emr_parts(tvs)
        for t, (tv, mk) in enumerate(zip(tvs, masks, strict=True)):
            num[t] += float(tv.double().abs().mean())
            den[t] += float((unified * mk).double().abs().mean())
    return [a / b for a, b in zip(num, den, strict=True)]


def philox_uniform(key: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The DARE/DELLA uniforms of a tensor: entry i is word i mod 4 of Philox4x32-10 at counter
    (⌊i/4⌋, 0, 0, 0) under key (low, high 32 bits), times 2⁻³² (Salmon et al., SC 2011);
    numpy uint64 arithmetic on 32-bit words."""
    low = np.uint64(0xFFFFFFFF)
    n = math.prod(shape)
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    zero = np.zeros_like(blocks)
    c = [blocks & low, blocks >> np.uint64(32), zero, zero]
    k = [np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)]
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        top = np.uint64(32)
        c = [(p1 >> top) ^ c[1] ^ k[0], p1 & low, (p0 >> top) ^ c[3] ^ k[1], p0 & low]
        k = [(k[0] + np.uint64(0x9E3779B9)) & low, (k[1] + np.uint64(0xBB67AE85)) & low]
    words = np.stack(c, axis=1).reshape(-1)[:n]
    return torch.from_numpy(words.astype(np.float64) / 2**32).reshape(shape)
