"""LoRA experts as an Arrow MoE (peft's ``ArrowConfig`` / ``create_arrow_model``).

Arrow (Ostapenko et al., 2024) routes each token, in every LoRA-adapted linear layer, by the
absolute dot product of its hidden state with one prototype per expert: the first right-singular
vector of that expert's B·A; the top k experts are mixed with a softmax over their scores
(divided by the router temperature). GenKnowSub first subtracts the mean A and the mean B of
general-knowledge adapters from every expert's A and B. peft computes both at run time; this
module validates the adapters for it, and measures the prototypes for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import RecipeError, SourceError
from mergecli.layers import layer_index
from mergecli.sources.adapter import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    UNSUPPORTED_OPTIONS,
    pattern_key,
    peft_type,
    read_peft_config,
)
from mergecli.sources.checkpoint import Checkpoint

ARROW_REFUSED = {k: v for k, v in UNSUPPORTED_OPTIONS.items() if k != "arrow_config"} | {
    "arrow_config": "it is already an Arrow router",
    "modules_to_save": "Arrow routes LoRA products only, not saved modules",
    "lora_bias": "Arrow ignores LoRA's trained bias",
}
"""Adapter options that peft's Arrow cannot route, with the reason."""


@dataclass(frozen=True)
class ArrowAdapter:
    """One LoRA adapter routed by Arrow: its folder, tensors and per-module scale s (α/r)."""

    name: str
    path: Path
    label: str
    weights: Checkpoint
    rank: int
    scales: dict[str, float]
    """Module name (without peft's prefix) → α/r, or α/√r with rsLoRA."""

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module in float64, as stored (unscaled)."""
        key = f"{PEFT_PREFIX}{module}"
        a = self.weights.read(f"{key}.lora_A.weight").to(torch.float64)
        b = self.weights.read(f"{key}.lora_B.weight").to(torch.float64)
        return a, b


def open_arrow_adapter(path: Path, name: str, label: str) -> ArrowAdapter:
    """Validate one adapter for Arrow: LoRA on linear layers, one rank, no saved modules."""
    config = read_peft_config(path, label)
    where = path / ADAPTER_CONFIG
    if peft_type(config) != "LORA":
        raise SourceError(f"{label}: {where}: Arrow routes LoRA adapters, not {peft_type(config)}")
    for option, reason in ARROW_REFUSED.items():
        if getattr(config, option, None):
            raise SourceError(f"{label}: {where} sets {option}: {reason}", where)
    weights = Checkpoint(path, label)
    scales: dict[str, float] = {}
    ranks: set[int] = set()
    for key in weights.tensor_names():
        inner = key.removeprefix(PEFT_PREFIX)
        if inner.endswith(".lora_B.weight"):
            continue
        if not key.startswith(PEFT_PREFIX) or not inner.endswith(".lora_A.weight"):
            raise SourceError(
                f"{label}: tensor '{key}' in {weights.info(key).file} is not a LoRA factor of a "
                "linear layer, which is all Arrow routes",
                weights.info(key).file,
            )
        module = inner.removesuffix(".lora_A.weight")
        key_b = f"{PEFT_PREFIX}{module}.lora_B.weight"
        a = weights.info(key).shape
        if key_b not in weights or len(a) != 2 or weights.info(key_b).shape[1:] != a[:1]:
            raise SourceError(f"{label}: tensor '{key}' has no matching '{key_b}'", path)
        ranks.add(a[0])
        pattern = pattern_key(config.alpha_pattern or {}, module)
        alpha = config.alpha_pattern[pattern] if pattern else config.lora_alpha
        scales[module] = alpha / (math.sqrt(a[0]) if config.use_rslora else a[0])
    if not scales:
        raise SourceError(f"{label}: '{path}' holds no LoRA factors", path)
    if len(ranks) != 1:
        raise SourceError(
            f"{label}: '{path}' has ranks {sorted(ranks)}; Arrow needs one rank in every module",
            path,
        )
    return ArrowAdapter(name, path, label, weights, ranks.pop(), scales)


def check_compatible(adapters: list[ArrowAdapter], base: Checkpoint, top_k: int) -> list[str]:
    """The modules every adapter adapts (in order); one-line errors where peft's Arrow would
    fail: different ranks, modules or shapes, a module the base lacks, top_k above the experts."""
    first = adapters[0]
    modules = list(first.scales)
    for adapter in adapters[1:]:
        if adapter.rank != first.rank:
            raise SourceError(
                f"{adapter.label}: rank {adapter.rank}, but {first.label} has rank "
                f"{first.rank}; Arrow needs one rank for all adapters",
                adapter.path,
            )
        if set(adapter.scales) != set(modules):
            odd = sorted(set(adapter.scales) ^ set(modules))[0]
            raise SourceError(
                f"{adapter.label}: adapts other modules than {first.label} (e.g. '{odd}'); "
                "Arrow needs the same target modules in all adapters",
                adapter.path,
            )
    for module in modules:
        weight = f"{module}.weight"
        if weight not in base:
            raise SourceError(
                f"{first.label}: module '{module}' is not in the base {base.path}", first.path
            )
        a_key = f"{PEFT_PREFIX}{module}.lora_A.weight"
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        shape = base.info(weight).shape
        for adapter in adapters:
            a, b = adapter.weights.info(a_key).shape, adapter.weights.info(b_key).shape
            if (b[0], a[1]) != shape:
                raise SourceError(
                    f"{adapter.label}: '{module}' has B·A of shape {[b[0], a[1]]}, the base's "
                    f"'{weight}' is {list(shape)}",
                    adapter.path,
                )
    return modules


def check_top_k(top_k: int, experts: int) -> None:
    if top_k > experts:
        raise RecipeError(
            f"moe.top_k: {top_k} experts per token, but the recipe has {experts} experts",
            "moe.top_k",
        )


def top_singular(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The right-singular vectors and singular values of B·A (B: out×r, A: r×in), from the
    r×r core: B = Qb Rb, Aᵀ = Qa Ra, B·A = Qb (Rb Raᵀ) Qaᵀ, so B·A's right-singular vectors
    are Qa times the core's. Returns (V: in×r, singular values, descending)."""
    _, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    _, s, vh = torch.linalg.svd(rb @ ra.T)
    return qa @ vh.T, s


def general_mean(
    general: list[ArrowAdapter], module: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """GenKnowSub's mean A and mean B of the general adapters in one module."""
    if not general:
        return None
    factors = [g.factors(module) for g in general]
    return (
        torch.stack([a for a, _ in factors]).mean(0),
        torch.stack([b for _, b in factors]).mean(0),
    )


@dataclass
class ModuleStats:
    """One routed module: the experts' prototypes' pairwise |cosines| and the share of each
    expert's s·B·A that its prototype explains, σ1² / Σ σi²."""

    module: str
    layer: int | None
    prototypes: torch.Tensor
    """Experts × in_features, unit rows (signs as the SVD returns them)."""
    share: list[float]

    @property
    def cosines(self) -> list[list[float]]:
        return (self.prototypes @ self.prototypes.T).abs().tolist()

    def summary(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "layer": self.layer,
            "abs_cosine": self.cosines,
            "singular_value_share": self.share,
        }


def module_stats(
    experts: list[ArrowAdapter], general: list[ArrowAdapter], module: str
) -> ModuleStats:
    """Prototypes and singular-value shares of one module, after GenKnowSub when general
    adapters are given (read here, one module at a time)."""
    mean = general_mean(general, module)
    prototypes, share = [], []
    for expert in experts:
        a, b = expert.factors(module)
        if mean is not None:
            a, b = a - mean[0], b - mean[1]
        v, s = top_singular(a, b)
        energy = float((s**2).sum())
        prototypes.append(v[:, 0])
        share.append(float(s[0] ** 2) / energy if energy > 0 else 0.0)
    return ModuleStats(module, layer_index(f"{module}.weight"), torch.stack(prototypes), share)


def layer_summary(stats: list[ModuleStats]) -> list[dict[str, Any]]:
    """Per layer: the mean off-diagonal |cosine| between prototypes and each expert's mean
    singular-value share, over the layer's routed modules."""
    layers: dict[int | None, list[ModuleStats]] = {}
    for item in stats:
        layers.setdefault(item.layer, []).append(item)
    rows = []
    for layer, items in layers.items():
        n = items[0].prototypes.shape[0]
        pairs = [
            c[i][j] for item in items for c in [item.cosines] for i in range(n) for j in range(n)
        ]
        off = [p for k, p in enumerate(pairs) if (k % (n * n)) // n != k % n]
        rows.append(
            {
                "layer": layer,
                "modules": len(items),
                "mean_abs_cosine": sum(off) / len(off) if off else None,
                "singular_value_share": [
                    sum(item.share[e] for item in items) / len(items) for e in range(n)
                ],
            }
        )
    return rows


def peft_recipe(experts: list[str], general: list[str], config: dict[str, Any]) -> str:
    """The plain peft code that builds the same model from the output folder."""
    args = ", ".join(f"{k}={v!r}" for k, v in config.items())
    lines = [
        "from peft import ArrowConfig, create_arrow_model",
        "from transformers import AutoModelForCausalLM",
        "",
        "base = AutoModelForCausalLM.from_pretrained(BASE)",
        "model = create_arrow_model(",
        "    base,",
        f"    task_specific_adapter_paths=[{', '.join(repr(f'FOLDER/{e}') for e in experts)}],",
        f"    arrow_config=ArrowConfig({args}),",
    ]
    if general:
        lines.append(
            f"    general_adapter_paths=[{', '.join(repr(f'FOLDER/{g}') for g in general)}],"
        )
    return "\n".join([*lines, ")"])
