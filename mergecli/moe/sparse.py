"""Full fine-tunes as a sparse MoE model: which output tensor comes from which input tensor.

In every decoder layer, expert e's MLP (gate, up and down projections) becomes MoE expert e and
a router (one row per expert) is added; every other tensor (attention, norms, embeddings, head)
comes from the base, or from a merge of the experts. The output uses the layout the model
families ship on the Hub (Mixtral: ``block_sparse_moe.experts.E.w1/w2/w3``; Qwen-MoE:
``mlp.experts.E.gate_proj/up_proj/down_proj``), which transformers loads natively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mergecli.errors import RecipeError, ShapeError

ARCHITECTURES = {
    "llama": "mixtral",
    "mistral": "mixtral",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
}
"""The base's model_type → the MoE family its experts become."""
FAMILIES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("qwen2",), "qwen3_moe": ("qwen3",)}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(\w+)\.weight$")
SHARED = -2
"""Source index of the shared expert (qwen2_moe); -1 is the base (or merged) model."""
BASE = -1


@dataclass(frozen=True)
class Copy:
    """Output tensor ``out`` is input ``source``'s tensor ``name`` (source: expert index,
    BASE or SHARED)."""

    out: str
    source: int
    name: str


@dataclass(frozen=True)
class Router:
    """Output tensor ``out``: the router rows of ``layer`` (``shared``: the shared expert's
    one-row gate)."""

    out: str
    layer: int
    shared: bool = False


Entry = Copy | Router


def architecture(model_type: str, requested: str | None) -> str:
    """The MoE family for a base of ``model_type`` (checked against moe.architecture)."""
    arch = requested or ARCHITECTURES.get(model_type)
    if arch is None:
        raise RecipeError(
            f"moe: base model_type '{model_type}' has no sparse MoE output; experts of "
            f"{', '.join(ARCHITECTURES)} models are supported",
            "moe.architecture",
        )
    if model_type not in FAMILIES[arch]:
        raise RecipeError(
            f"moe.architecture: {arch} is made from {' or '.join(FAMILIES[arch])} models, "
            f"the base is {model_type}",
            "moe.architecture",
        )
    return arch


def expert_tensor(arch: str, layer: int, expert: int, projection: str) -> str:
    if arch == "mixtral":
        name = MIXTRAL_NAMES[projection]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def router_tensor(arch: str, layer: int) -> str:
    if arch == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
    return f"model.layers.{layer}.mlp.gate.weight"


def tensor_map(arch: str, base_names: list[str], experts: int) -> list[Entry]:
    """Every output tensor in write order: per layer the router before the experts' MLPs."""
    entries: list[Entry] = []
    routed: set[int] = set()
    for name in base_names:
        match = MLP.match(name)
        if not match:
            entries.append(Copy(name, BASE, name))
            continue
        layer, projection = int(match.group(1)), match.group(2)
        if projection not in PROJECTIONS:
            raise ShapeError(
                f"base_model: '{name}' is not a gate/up/down projection; {arch} experts have "
                "no other MLP tensors",
                name,
            )
        if layer not in routed:
            routed.add(layer)
            entries.append(Router(router_tensor(arch, layer), layer))
            if arch == "qwen2_moe":
                entries.append(
                    Router(f"model.layers.{layer}.mlp.shared_expert_gate.weight", layer, True)
                )
        entries += [
            Copy(expert_tensor(arch, layer, e, projection), e, name) for e in range(experts)
        ]
        if arch == "qwen2_moe":
            shared = f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"
            entries.append(Copy(shared, SHARED, name))
    return entries


def moe_config(
    arch: str, base: dict[str, Any], experts: int, top_k: int, dtype: str, shared: int | None
) -> Any:
    """The output's transformers config: the base's, as the MoE class, with the experts.

    The router renormalises the top k probabilities (Mixtral's rule; ``norm_topk_prob`` for
    Qwen, as mergekit-moe sets it); each expert keeps the base's intermediate size."""
    import transformers

    if arch == "mixtral" and (base.get("attention_bias") or base.get("mlp_bias")):
        raise RecipeError(
            "moe: the base has attention or MLP biases, which Mixtral layers do not have",
            "moe.architecture",
        )
    keys = {
        k: v
        for k, v in base.items()
        if k not in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype")
    }
    if arch == "mixtral":
        config = transformers.MixtralConfig(**keys)
        config.num_local_experts = experts
        config.architectures = ["MixtralForCausalLM"]
    else:
        cls = transformers.Qwen3MoeConfig if arch == "qwen3_moe" else transformers.Qwen2MoeConfig
        config = cls(**keys)  # type: ignore[assignment]
        config.num_experts = experts
        config.moe_intermediate_size = base["intermediate_size"]
        config.decoder_sparse_step = 1
        config.mlp_only_layers = []
        config.norm_topk_prob = True
        config.architectures = [
            "Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "Qwen2MoeForCausalLM"
        ]
        if shared is not None:
            config.shared_expert_intermediate_size = shared
    config.num_experts_per_tok = top_k
    config.dtype = dtype
    return config
