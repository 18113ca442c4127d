"""TSV-Merge: task singular vectors, concatenated and decorrelated."""

from __future__ import annotations

import re

import torch

from mergecli.layers import is_before_layers
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import Param, Params, merge_method

_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output|head|score|classifier)\.")


def is_embedding_or_head(name: str) -> bool:
    """Token embeddings and output heads, which TSV merges by the mean."""
    return is_before_layers(name) or bool(_HEAD.search(name))


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ."""
    p, _, qt = torch.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_delta(tvs: list[torch.Tensor]) -> torch.Tensor:
    """U⊥ diag(S) V⊥ᵀ from the top k = ⌊min(m, n)/M⌋ singular triplets of each τt."""
    k = min(tvs[0].shape) // len(tvs)
    us, ss, vts = [], [], []
    for tv in tvs:
        u, s, vt = torch.linalg.svd(tv, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vts.append(vt[:k])
    u_perp = polar_factor(torch.cat(us, dim=1))
    vt_perp = polar_factor(torch.cat(vts, dim=0))
    return (u_perp * torch.cat(ss)) @ vt_perp


@merge_method(
    "tsv",
    "TSV-M: per 2-D tensor, concatenate each τt's top ⌊min(m,n)/M⌋ singular vectors, "
    "orthogonalise U and V by polar factors, Δ = U⊥ diag(S) V⊥ᵀ (other tensors, embeddings "
    "and heads: mean τt); θ = θ0 + α Δ",
    params=(Param("alpha", 1.0, help="scaling α of the merged task vector"),),
    convention=(
        "SVDs run in the compute dtype (float32 unless dtype: float64). Embeddings and output "
        "heads are found by name (embed, wte, lm_head, output, head, score, classifier); "
        "a 2-D tensor with min(m, n) < M (k = 0) also uses the mean."
    ),
)
def tsv(inputs: TensorInputs, p: Params) -> torch.Tensor:
    tvs = inputs.task_vectors()
    shape = tvs[0].shape
    if len(shape) == 2 and min(shape) >= len(tvs) and not is_embedding_or_head(inputs.name):
        delta = tsv_delta(tvs)
    else:
        delta = torch.stack(tvs).mean(0)
    assert inputs.base is not None
    return inputs.base + p["alpha"] * delta
