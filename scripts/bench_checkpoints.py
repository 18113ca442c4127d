"""Llama-shaped bfloat16 checkpoints of a chosen size, generated offline for the benchmarks.

``python -m scripts.bench_checkpoints OUT --size-mb 340`` writes ``OUT/base`` and
``OUT/expert{1,2,3}``: sharded safetensors folders with a Llama ``config.json``. The experts are
the base plus seeded noise, so task vectors are dense and every entry is touched by a merge.
A folder is reused when its ``config.json`` already describes the same model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYERS = 8
VOCAB = 32000


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-style decoder (full multi-head attention, untied head)."""

    hidden: int
    intermediate: int
    layers: int = LAYERS
    vocab: int = VOCAB
    tied: bool = False
    """Whether the output head shares the embedding (then no ``lm_head.weight``)."""

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order a Hugging Face Llama stores them."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            out += [
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        return out if self.tied else [*out, ("lm_head.weight", (self.vocab, h))]

    @property
    def parameters(self) -> int:
        return sum(torch.Size(shape).numel() for _, shape in self.tensors())

    def config(self) -> dict[str, object]:
        heads = max(1, self.hidden // 128)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
        }


def shape_for_size(size_mb: float, layers: int = LAYERS, vocab: int = VOCAB) -> LlamaShape:
    """The Llama shape (hidden a multiple of 128, intermediate ≈ 8/3 hidden rounded to 256)
    whose bfloat16 checkpoint is closest to ``size_mb`` megabytes."""
    target = size_mb * 1e6 / 2
    best: LlamaShape | None = None
    for hidden in range(128, 16385, 128):
        shape = LlamaShape(hidden, max(256, round(hidden * 8 / 3 / 256) * 256), layers, vocab)
        if best is None or abs(shape.parameters - target) < abs(best.parameters - target):
            best = shape
    assert best is not None
    return best


def write_checkpoint(
    folder: Path,
    shape: LlamaShape,
    shards: int,
    seed: int,
    base: Path | None = None,
    scale: float = 0.002,
) -> Path:
    """Write a sharded bfloat16 checkpoint: random weights, or ``base`` plus seeded noise.

    Tensors are generated one at a time, so memory stays at about one shard.
    """
    config = {**shape.config(), "bench_seed": seed, "bench_shards": shards}
    if (folder / "config.json").is_file() and json.loads(
        (folder / "config.json").read_text()
    ) == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = shape.tensors()
    per_shard = shape.parameters * 2 / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = torch.Size(dims).numel() * 2
        if groups[-1] and size + nbytes > per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {}
        for name, dims in group:
            if base is None:
                value = torch.randn(dims, generator=gen) * (1.0 if len(dims) == 1 else 0.02)
            else:
                value = _base_tensor(base, name).float()
                value += torch.randn(dims, generator=gen) * scale
            state[name] = value.to(torch.bfloat16)
            weight_map[name] = file
        save_file(state, folder / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": shape.parameters * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _base_tensor(base: Path, name: str) -> torch.Tensor:
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base / weight_map[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def write_models(
    out: Path, shape: LlamaShape, experts: int = 3, shards: int = 4
) -> tuple[Path, list[Path]]:
    """A base and ``experts`` fine-tune stand-ins under ``out``."""
    base = write_checkpoint(out / "base", shape, shards, seed=0)
    return base, [
        write_checkpoint(out / f"expert{t + 1}", shape, shards, seed=t + 1, base=base)
        for t in range(experts)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-mb", type=float, default=1000.0, help="size of each checkpoint")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    args = parser.parse_args()
    shape = shape_for_size(args.size_mb, args.layers, args.vocab)
    base, experts = write_models(args.out, shape, args.experts, args.shards)
    print(base, *experts)


if __name__ == "__main__":
    main()
