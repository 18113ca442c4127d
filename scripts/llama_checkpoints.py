"""Llama-shaped safetensors checkpoints of any size, generated offline for the benchmarks.

Tensors are written directly (no model is instantiated), shard by shard, with the index and a
``config.json`` that transformers reads, so a 1 GB checkpoint costs one shard of memory to make.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix every tensor of a Llama checkpoint."""

    layers: int
    hidden: int = 512
    intermediate: int = 1376
    vocab: int = 4096
    heads: int = 8
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in checkpoint order."""
        kv = self.hidden // self.heads * self.kv_heads
        names: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))
        ]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            names += [
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        names += [
            ("model.norm.weight", (self.hidden,)),
            ("lm_head.weight", (self.vocab, self.hidden)),
        ]
        return names

    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for _, shape in self.tensors())

    def largest(self) -> int:
        return max(torch.Size(shape).numel() for _, shape in self.tensors())

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=False,
        )


def layers_for_size(target_bytes: int, shape: LlamaShape, dtype: torch.dtype) -> LlamaShape:
    """``shape`` with the layer count that brings the checkpoint closest to ``target_bytes``."""
    item = torch.empty((), dtype=dtype).element_size()
    fixed = replace(shape, layers=0).numel() * item
    per_layer = replace(shape, layers=1).numel() * item - fixed
    return replace(shape, layers=max(1, round((target_bytes - fixed) / per_layer)))


def plan_shards(shape: LlamaShape, shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors split in order into at most ``shards`` groups of about equal size."""
    target = shape.numel() / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, dims in shape.tensors():
        if filled >= target and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append((name, dims))
        filled += torch.Size(dims).numel()
    return groups


def write_checkpoint(
    folder: Path,
    shape: LlamaShape,
    *,
    seed: int,
    base: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 4,
    scale: float = 0.02,
) -> Path:
    """A base (random weights) or, given ``base``, an expert: base + seeded noise of ``scale``.

    The tensors are spread over ``shards`` files of about equal size; one shard is in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    base_map = (
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        if base
        else None
    )
    groups = plan_shards(shape, shards)
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for name, dims in group:
            if base is not None and base_map is not None:
                with safe_open(base / base_map[name], framework="pt") as f:
                    tensor = f.get_tensor(name).float() + torch.randn(dims, generator=gen) * scale
            elif name.endswith("norm.weight"):
                tensor = torch.ones(dims)
            else:
                tensor = torch.randn(dims, generator=gen) * 0.02
            shard[name] = tensor.to(dtype)
            weight_map[name] = file
        save_file(shard, str(folder / file), metadata={"format": "pt"})
    total = shape.numel() * torch.empty((), dtype=dtype).element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = shape.config()
    config.dtype = dtype
    config.save_pretrained(folder)
    return folder


def write_family(
    root: Path, shape: LlamaShape, experts: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[Path, list[Path]]:
    """A base and ``experts`` experts under ``root``; skipped when already complete."""
    base = root / "base"
    if not (base / "config.json").exists():
        write_checkpoint(base, shape, seed=0, dtype=dtype)
    paths = []
    for i in range(experts):
        folder = root / f"expert{i}"
        if not (folder / "config.json").exists():
            write_checkpoint(folder, shape, seed=1 + i, base=base, dtype=dtype)
        paths.append(folder)
    return base, paths
