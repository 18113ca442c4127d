"""`analyze interference` against dense computations of Appendix I and METHODS.md, written here.

Experts are written as base + a constructed task vector, so every figure has a known answer.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergecli.analyze import analyze_interference
from mergecli.blocks import block_of
from mergecli.errors import RecipeError
from mergecli.recipe import recipe_from_dict
from tests.conftest import EXPERTS
from tests.helpers import load_state

LAYER_TENSOR = "model.layers.0.mlp.up_proj.weight"


def write_experts(root: Path, base: dict, taus: list[dict], names=None) -> dict:
    """base and base + τt as single-file safetensors checkpoints; returns a recipe mapping."""
    save_file(base, _folder(root / "base") / "model.safetensors")
    names = names or [f"e{t}" for t in range(len(taus))]
    for name, tau in zip(names, taus, strict=True):
        state = {k: base[k] + tau[k] for k in base}
        save_file(state, _folder(root / name) / "model.safetensors")
    return {
        "merge_method": "ties",  # any method: the analysis ignores it and its parameters
        "base_model": str(root / "base"),
        "models": [{"model": str(root / n), "parameters": {"density": 0.3}} for n in names],
        "parameters": {"lambda": 2.0},
    }


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def analyze(recipe: dict, **options) -> dict:
    return analyze_interference(recipe_from_dict(recipe), **options)


# -- a case computed by hand ---------------------------------------------------------------

TAUS = [  # 2×3, flat indices 0..5; base = 1 everywhere, so base + τ is exact in float32
    [[4.0, -2.0, 1.0], [0.0, 3.0, -1.0]],
    [[-3.0, 0.0, 2.0], [0.0, 0.5, -4.0]],
    [[2.0, -1.0, -0.5], [0.0, 1.0, -2.0]],
]


def test_hand_checked_three_experts(tmp_path: Path) -> None:
    base = {LAYER_TENSOR: torch.ones(2, 3)}
    recipe = write_experts(tmp_path, base, [{LAYER_TENSOR: torch.tensor(t)} for t in TAUS])
    got = analyze(recipe, top_k=0.5, tall_lambda=0.5)
    # k = 3 of 6. |τ1| = 4 2 1 0 3 1 → κ 2, M1 {0,1,4}; |τ2| = 3 0 2 0 .5 4 → κ 2, M2 {0,2,5};
    # |τ3| = 2 1 .5 0 1 2 → κ 1 (tied at rank 3, both kept), M3 {0,1,4,5}
    assert got["thresholds"] == [2.0, 2.0, 1.0]
    m = got["model"]
    assert m["kept"] == pytest.approx([50.0, 50.0, 400 / 6])
    # pair 12: union {0,1,2,4,5}, both {0}: 4 vs −3 conflict. pair 13: union {0,1,4,5}, both
    # {0,1,4}, same signs. pair 23: union {0,1,2,4,5}, both {0,5}: −3 vs 2 conflict, −4 vs −2 not.
    sign = [[0, 20, 0], [20, 0, 20], [0, 20, 0]]
    overlap = [[100, 100 / 3, 100], [100 / 3, 100, 200 / 3], [75, 50, 100]]
    ratio = [[1, 4 / 3, 7 / 3], [4 / 3, 1, 1.75], [7 / 3, 1.75, 1]]  # 13: (4/2 + 2/1 + 3/1)/3
    for key, want in (("sign_conflict", sign), ("overlap", overlap), ("magnitude_ratio", ratio)):
        assert m[key]["matrix"] == [pytest.approx(row) for row in want], key
    assert m["sign_conflict"]["mean"] == pytest.approx(40 / 3)
    assert m["overlap"]["mean"] == pytest.approx((100 / 3 * 2 + 100 + 75 + 200 / 3 + 50) / 6)
    assert m["magnitude_ratio"]["mean"] == pytest.approx((4 / 3 + 7 / 3 + 1.75) / 3)
    # τ̃² summed over experts on the union {0,1,2,4,5}: 29 + 5 + 4 + 10 + 20 = 68
    assert m["variance"] == pytest.approx(68 / (3 * 5))
    assert m["ties_sign_conflict"] == pytest.approx(20.0)  # only entry 0 (+, −, +)
    # τMTL = 3 −3 2.5 0 4.5 −7; masks on per entry: 2, 1, 2, 0, 1, 1 (entry 0, expert 2 is the
    # tie 3 > 0.5·6 = 3: off) → selfish {1, 4, 5}, catastrophic {3}
    assert m["tall_selfish"] == pytest.approx(50.0)
    assert m["tall_catastrophic"] == pytest.approx(100 / 6)
    assert m["norm"] == pytest.approx([math.sqrt(31), math.sqrt(29.25), math.sqrt(10.25)])
    dots = {(0, 1): -4.5, (0, 2): 14.5, (1, 2): 1.5}
    for (s, t), dot in dots.items():
        want = dot / (m["norm"][s] * m["norm"][t])
        assert m["cosine"]["matrix"][s][t] == pytest.approx(want)
        assert m["cosine"]["matrix"][t][s] == pytest.approx(want)
    assert got["layers"][0]["layer"] == "model.layers.0"
    assert got["blocks"][0]["block"] == "model.layers.0.mlp"
    for group in (got["layers"][0], got["blocks"][0]):
        assert {k: v for k, v in group.items() if k not in ("layer", "index", "block")} == m


def test_undefined_figures_are_null(tmp_path: Path) -> None:
    """Disjoint supports: no shared entry, so the magnitude ratio of the pair is undefined."""
    base = {LAYER_TENSOR: torch.zeros(4)}
    taus = [
        {LAYER_TENSOR: torch.tensor([1.0, 0, 0, 0])},
        {LAYER_TENSOR: torch.tensor([0, 0, -2.0, 0])},
    ]
    m = analyze(write_experts(tmp_path, base, taus), top_k=0.25)["model"]
    assert m["magnitude_ratio"]["matrix"][0][1] is None
    assert m["magnitude_ratio"]["mean"] is None
    assert m["overlap"]["mean"] == 0.0 and m["sign_conflict"]["mean"] == 0.0
    assert m["cosine"]["matrix"][0][1] == 0.0


# -- dense reference on whole task vectors -------------------------------------------------


def dense_figures(taus: list[torch.Tensor], kappas: list[float], lam: float) -> dict:
    """Appendix I and METHODS.md on concatenated float32 task vectors, entry by entry."""
    n, experts = taus[0].numel(), len(taus)
    pruned = [
        torch.where(t.abs() >= k, t, torch.zeros_like(t)) for t, k in zip(taus, kappas, strict=True)
    ]
    top = [p != 0 for p in pruned]
    sign, overlap, ratio, cosine = ([[None] * experts for _ in range(experts)] for _ in range(4))
    for s, t in itertools.product(range(experts), repeat=2):
        a, b = pruned[s], pruned[t]
        active = (a != 0) | (b != 0)
        opposite = ((a > 0) & (b < 0)) | ((a < 0) & (b > 0))
        sign[s][t] = 100 * int(opposite.sum()) / int(active.sum())
        overlap[s][t] = 100 * int((top[s] & top[t]).sum()) / int(top[s].sum())
        o = top[s] & top[t]
        x, y = taus[s][o].double().abs(), taus[t][o].double().abs()
        ratio[s][t] = float((torch.maximum(x, y) / torch.minimum(x, y)).mean()) if o.any() else None
        cosine[s][t] = float(
            torch.nn.functional.cosine_similarity(taus[s].double(), taus[t].double(), dim=0)
        )
    union = torch.stack(top).any(0)
    per_entry = sum(p.double() ** 2 for p in pruned) / experts
    positive = torch.stack([p > 0 for p in pruned]).any(0)
    negative = torch.stack([p < 0 for p in pruned]).any(0)
    mtl = sum(taus)
    on = sum((t.abs() > lam * (mtl - t).abs()).long() for t in taus)
    return {
        "parameters": n,
        "sign_conflict": sign,
        "overlap": overlap,
        "magnitude_ratio": ratio,
        "cosine": cosine,
        "variance": float(per_entry[union].mean()),
        "ties_sign_conflict": 100 * int((positive & negative).sum()) / int(union.sum()),
        "tall_selfish": 100 * int((on == 1).sum()) / n,
        "tall_catastrophic": 100 * int((on == 0).sum()) / n,
        "norm": [float(t.double().norm()) for t in taus],
        "kept": [100 * int(x.sum()) / n for x in top],
    }


def pair_mean(matrix: list[list]) -> float | None:
    values = [v for s, row in enumerate(matrix) for t, v in enumerate(row) if s != t]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def assert_matches(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        if key in ("sign_conflict", "overlap", "magnitude_ratio", "cosine"):
            for s, row in enumerate(value):
                for t, v in enumerate(row):
                    g = got[key]["matrix"][s][t]
                    assert (g is None) == (v is None), (where, key, s, t)
                    if v is not None:
                        assert g == pytest.approx(v, rel=1e-9, abs=1e-12), (where, key, s, t)
            mean = pair_mean(value)
            assert got[key]["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12), (where, key)
        elif isinstance(value, list):
            assert got[key] == pytest.approx(value, rel=1e-9), (where, key)
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (where, key)


def llama_block(name: str) -> str:
    """Component blocks of Llama names, spelt out for the test."""
    match = re.match(
        r"(model\.layers\.\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\.", name
    )
    return f"{match.group(1)}.{match.group(2)}" if match else name


@pytest.mark.parametrize("zoo_name", ["zoo", "zoo_bf16"])
def test_every_figure_matches_the_dense_computation(
    zoo_name: str, request: pytest.FixtureRequest
) -> None:
    zoo: Path = request.getfixturevalue(zoo_name)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / n)} for n in EXPERTS],
    }
    got = analyze(recipe, top_k=0.3, tall_lambda=0.6)
    base = {k: v.float() for k, v in load_state(zoo / "base").items()}
    experts = [{k: v.float() for k, v in load_state(zoo / n).items()} for n in EXPERTS]
    names = sorted(base)
    cat = [torch.cat([(e[k] - base[k]).flatten() for k in names]) for e in experts]
    n = cat[0].numel()
    k = math.ceil(0.3 * n)
    kappas = [torch.kthvalue(c.abs(), n - k + 1).values.item() for c in cat]
    assert got["thresholds"] == kappas  # exact: the same float as the dense k-th value
    assert_matches(got["model"], dense_figures(cat, kappas, 0.6), "model")
    groups = {
        "layers": lambda x: re.match(r"model\.layers\.\d+", x).group(0) if "layers." in x else None,
        "blocks": llama_block,
    }
    for kind, group_of in groups.items():
        members: dict[str, list[str]] = {}
        for name in names:
            if group_of(name) is not None:
                members.setdefault(group_of(name), []).append(name)
        key = kind[:-1]
        assert [g[key] for g in got[kind]] == sorted(
            members, key=lambda g: names.index(members[g][0])
        )
        for group in got[kind]:
            taus = [
                torch.cat([(e[x] - base[x]).flatten() for x in members[group[key]]])
                for e in experts
            ]
            assert_matches(group, dense_figures(taus, kappas, 0.6), group[key])


def test_model_scope_thresholds_differ_from_per_tensor_ones(tmp_path: Path) -> None:
    """Top-k over the whole model: a tensor of small changes keeps (almost) nothing."""
    gen = torch.Generator().manual_seed(0)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight")
    base = {n: torch.randn(64, 32, generator=gen) for n in names}
    taus = [
        {
            names[0]: torch.randn(64, 32, generator=gen),
            names[1]: 0.01 * torch.randn(64, 32, generator=gen),
        }
        for _ in range(2)
    ]
    got = analyze(write_experts(tmp_path, base, taus), top_k=0.2)
    state = [load_state(tmp_path / f"e{t}") for t in range(2)]
    cat = [torch.cat([(s[x] - base[x]).flatten() for x in names]) for s in state]
    k = math.ceil(0.2 * cat[0].numel())
    want = [torch.kthvalue(c.abs(), c.numel() - k + 1).values.item() for c in cat]
    assert got["thresholds"] == want
    small = next(b for b in got["blocks"] if b["block"] == "model.layers.1.self_attn")
    large = next(b for b in got["blocks"] if b["block"] == "model.layers.0.self_attn")
    assert small["kept"] == [0.0, 0.0]  # per tensor it would be 20 %
    assert large["kept"] == pytest.approx([40.0, 40.0], abs=0.5)
    assert got["model"]["kept"] == pytest.approx([100 * k / cat[0].numel()] * 2)


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn"),
        ("model.layers.3.self_attn.q_norm.weight", "model.layers.3.self_attn.q_norm"),
        ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp"),
        ("model.layers.3.input_layernorm.weight", "model.layers.3.input_layernorm"),
        (
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.3.post_attention_layernorm",
        ),
        ("model.norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("transformer.h.1.ln_2.bias", "transformer.h.1.ln_2"),
        ("transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn"),
        ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp"),
        ("bert.encoder.layer.2.intermediate.dense.weight", "bert.encoder.layer.2.mlp"),
        ("bert.encoder.layer.2.output.dense.weight", "bert.encoder.layer.2.mlp"),
        ("bert.encoder.layer.2.output.LayerNorm.weight", "bert.encoder.layer.2.output.LayerNorm"),
        ("model.layers.0.block_sparse_moe.experts.1.w2.weight", "model.layers.0.mlp"),
    ],
)
def test_component_blocks(name: str, block: str) -> None:
    assert block_of(name) == block


def test_recipe_problems_are_one_line_errors(tmp_path: Path, zoo: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": str(zoo / n)} for n in EXPERTS]}
    with pytest.raises(RecipeError) as caught:
        analyze(recipe)
    assert caught.value.key == "base_model"
    recipe["base_model"] = str(zoo / "base")
    with pytest.raises(RecipeError) as caught:
        analyze(recipe, top_k=0.0)
    assert caught.value.key == "--top-k"
    with pytest.raises(RecipeError, match="at least two experts") as caught:
        analyze({**recipe, "models": recipe["models"][:1]})
    assert caught.value.key == "models"
    run = tmp_path / "run"
    for step in (10, 20):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    recipe["models"][0]["model"] = str(run)
    with pytest.raises(
        RecipeError, match=r"checkpoint-10 … checkpoint-20.*--over-checkpoints"
    ) as e:
        analyze(recipe)
    assert e.value.key == "models[0].model"
