"""Router rows of a sparse MoE model, as mergekit-moe defines its gate modes.

Every mode returns a (layers, experts, hidden) tensor; row e of layer l initialises the router
weight of expert e in layer l.

- ``random``: standard normal entries from a generator seeded with the recipe's seed.
- ``cheap_embed``: the sum of the base's input embeddings of every token of an expert's positive
  prompts (each prompt preceded by the BOS token, no other special tokens), normalised; the same
  for negative prompts is subtracted and the difference normalised again. Equal in every layer.
- ``hidden``: the base's hidden state entering layer l at the last token of each prompt, averaged
  over the prompts; positive minus negative, normalised per layer. The base runs one decoder
  layer at a time, so one layer's weights are in memory, never the whole model (each layer's
  tensors read by the runner, ``engine/whole.read_whole``). Each prompt runs
  alone (mergekit pads a batch and reads its last position, which is a pad token for shorter
  prompts; equal with prompts of one length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergecli.engine.whole import read_whole
from mergecli.errors import RecipeError, SourceError
from mergecli.recipe import MoePrompts
from mergecli.sources.checkpoint import Checkpoint

EMBED = "model.embed_tokens.weight"


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids: the BOS token (if the tokenizer has one) then the prompt's tokens."""
    bos = tokenizer.bos_token or ""
    return [tokenizer(bos + p, add_special_tokens=False)["input_ids"] for p in prompts]


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError, ValueError...
        raise SourceError(
            f"base_model: no tokenizer in '{folder}' for the gate prompts: "
            f"{' '.join(str(exc).split())[:300]}",
            folder,
        ) from None


def random_gates(layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((layers, experts, hidden), generator=gen)


def cheap_embed_gates(
    base: Checkpoint, tokenizer: Any, prompts: list[MoePrompts], layers: int
) -> torch.Tensor:
    embed = read_whole(base, [EMBED])[EMBED].to(torch.float32)

    def embedded(texts: list[str]) -> torch.Tensor:
        ids = torch.tensor([i for row in token_ids(tokenizer, texts) for i in row])
        return normalise(embed[ids].sum(0))

    rows = []
    for p in prompts:
        row = embedded(p.positive)
        if p.negative:
            row = normalise(row - embedded(p.negative))
        rows.append(row)
    return torch.stack(rows).expand(layers, -1, -1).clone()


def last_token_states(base: Checkpoint, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(layers, prompts, hidden): the hidden state entering each decoder layer at each prompt's
    last token, the base run one layer at a time in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base.path))
    config._attn_implementation = "sdpa"  # no mask given: causal attention
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config).model
    rotary = type(skeleton.rotary_emb)(config=config)
    embed = read_whole(base, [EMBED])[EMBED].to(torch.float32)
    states = [embed[torch.tensor(ids)].unsqueeze(0) for ids in token_ids(tokenizer, texts)]
    del embed
    positions = [torch.arange(h.shape[1]).unsqueeze(0) for h in states]
    rope = [rotary(h, position_ids=p) for h, p in zip(states, positions, strict=True)]
    out = []
    names = base.tensor_names()
    with torch.no_grad():
        for index, layer in enumerate(skeleton.layers):
            prefix = f"model.layers.{index}."
            layer_names = [n for n in names if n.startswith(prefix)]
            weights = {
                n.removeprefix(prefix): t.to(torch.float32)
                for n, t in read_whole(base, layer_names).items()
            }
            layer.load_state_dict(weights, strict=True, assign=True)
            del weights
            out.append(torch.stack([h[0, -1] for h in states]))
            states = [
                layer(h, attention_mask=None, position_ids=p, position_embeddings=r)
                for h, p, r in zip(states, positions, rope, strict=True)
            ]
            layer.to("meta")  # drops this layer's weights before the next is read
    return torch.stack(out)


def hidden_gates(base: Checkpoint, tokenizer: Any, prompts: list[MoePrompts]) -> torch.Tensor:
    texts = [t for p in prompts for t in (*p.positive, *p.negative)]
    states = last_token_states(base, tokenizer, texts)
    rows, at = [], 0
    for p in prompts:
        row = states[:, at : at + len(p.positive)].mean(1)
        at += len(p.positive)
        if p.negative:
            row = row - states[:, at : at + len(p.negative)].mean(1)
            at += len(p.negative)
        rows.append(normalise(row))
    return torch.stack(rows, dim=1)


def gate_rows(
    mode: str,
    base: Checkpoint,
    prompts: list[MoePrompts] | None,
    layers: int,
    hidden: int,
    experts: int,
    seed: int,
) -> torch.Tensor:
    """(layers, experts, hidden) router rows for ``mode``."""
    if mode == "random":
        return random_gates(layers, experts, hidden, seed)
    if prompts is None:
        raise RecipeError(f"moe.prompts: gate_mode {mode} needs prompts", "moe.prompts")
    tokenizer = load_tokenizer(base.path)
    if mode == "cheap_embed":
        return cheap_embed_gates(base, tokenizer, prompts, layers)
    return hidden_gates(base, tokenizer, prompts)
