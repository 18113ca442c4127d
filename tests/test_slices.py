"""slices and passthrough: layer ranges of several models stacked into a new depth.

Every output tensor is checked against the source tensor (or whole-tensor formula) that an
independent layer map written here says it comes from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import mergecli
from mergecli.conventions import unset_differing
from mergecli.errors import MergeError, RecipeError, SourceError
from mergecli.recipe import recipe_from_dict
from scripts.fixtures import save_model
from tests.helpers import load_state, run_cli, write_recipe

LAYER = "model.layers."


def expected_stack(
    layers: list[tuple[dict[str, torch.Tensor], int]],
    first: dict[str, torch.Tensor],
    last: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The stacked state: output layer k is layer ``layers[k][1]`` of ``layers[k][0]``;
    embeddings from ``first``, everything else outside the layers from ``last``."""
    out = {}
    for name, value in first.items():
        if not name.startswith(LAYER) and "embed" in name:
            out[name] = value
    for name, value in last.items():
        if not name.startswith(LAYER) and "embed" not in name:
            out[name] = value
    for k, (state, source_layer) in enumerate(layers):
        prefix = f"{LAYER}{source_layer}."
        for name, value in state.items():
            if name.startswith(prefix):
                out[f"{LAYER}{k}.{name[len(prefix) :]}"] = value
    return out


def merge(folder: Path, recipe: dict[str, Any], *args: str) -> Path:
    path = write_recipe(folder, recipe)
    out = folder / "out"
    result = run_cli("merge", str(path), "--output", str(out), "--quiet", *args)
    assert result.exit_code == 0, result.output
    return out


def assert_state(out: Path, want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    got = load_state(out)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.allclose(got[name].double(), value.double(), atol=atol, rtol=0), name


def forward(out: Path, layers: int) -> None:
    """The folder loads in transformers with ``layers`` layers and runs a forward pass."""
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == layers
    logits = model(torch.tensor([[1, 5, 9, 12, 2]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())


def test_depth_upscaling_passthrough(zoo: Path, tmp_path: Path) -> None:
    """SOLAR-style: layers 0–1 then 1–2 of one model (4 layers), one slice scaled."""
    recipe = {
        "slices": [
            {"sources": [{"model": str(zoo / "base"), "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": str(zoo / "base"),
                        "layer_range": [1, 3],
                        "parameters": {"scale": 0.5},
                    }
                ]
            },
        ],
        "merge_method": "passthrough",
    }
    out = merge(tmp_path, recipe)
    base = load_state(zoo / "base")
    want = expected_stack([(base, 0), (base, 1), (base, 1), (base, 2)], base, base)
    for k in (2, 3):
        for name in want:
            if name.startswith(f"{LAYER}{k}."):
                want[name] = 0.5 * want[name]
    for name in want:
        if not name.startswith(LAYER) and "embed" not in name:
            want[name] = 0.5 * want[name]  # the last slice's parameters reach the head
    assert_state(out, want)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    forward(out, 4)


def test_frankenmerge_of_two_models(zoo: Path, tmp_path: Path) -> None:
    """orca-mini / Platypus style: layers 0–1 of one model, then 1–2 of another."""
    recipe = {
        "slices": [
            {"sources": [{"model": str(zoo / "math"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(zoo / "code"), "layer_range": [1, 3]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "conventions": "mergekit",
    }
    out = merge(tmp_path, recipe)
    a, b = load_state(zoo / "math"), load_state(zoo / "code")
    want = expected_stack([(a, 0), (a, 1), (b, 1), (b, 2)], a, b)
    assert_state(out, {k: v.to(torch.bfloat16) for k, v in want.items()})
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    forward(out, 4)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["layers"][2] == "2 ← slices[1]: code:1"


def test_per_layer_config_lists_follow_the_layer_map(tmp_path: Path) -> None:
    """A config's ``layer_types`` gets one entry per output layer, from the layer it copies
    (transformers refuses a list whose length differs from num_hidden_layers)."""
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=types,
    )
    model = save_model(Qwen2ForCausalLM(config), tmp_path / "qwen", torch.float32)
    recipe = {
        "slices": [
            {"sources": [{"model": str(model), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(model), "layer_range": [1, 3]}]},
        ],
        "merge_method": "passthrough",
    }
    out = merge(tmp_path, recipe)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == [types[0], types[1], types[1], types[2]]
    state = load_state(model)
    assert_state(
        out, expected_stack([(state, 0), (state, 1), (state, 1), (state, 2)], state, state)
    )
    forward(out, 4)


def slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (float64), linear when nearly
    parallel."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = float(x @ y / (x.norm() * y.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a.double() + t * b.double()
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a.double() + math.sin(t * omega) * b.double()) / math.sin(
        omega
    )


def test_gradient_slerp_over_a_slice(zoo: Path, tmp_path: Path) -> None:
    """mergekit's gradient-slerp in slices syntax: t runs over the slice's 3 layers
    (0, 0.5, 1 for self_attn); every other tensor, embeddings and head included, at 0.3."""
    a, b = zoo / "math", zoo / "code"
    recipe = {
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 3]},
                    {"model": str(b), "layer_range": [0, 3]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": str(a),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]},
        "conventions": "mergekit",
    }
    out = merge(tmp_path, recipe)
    sa, sb = load_state(a), load_state(b)
    want = {}
    for name in sa:
        t = 0.3
        if "self_attn" in name:
            t = int(name.split(".")[2]) / 2
        want[name] = slerp64(sa[name], sb[name], t)
    assert_state(out, want, atol=2e-6)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["layers"][1] == "1 ← slices[0]: base math:1, code:1"


def test_linear_slices_with_per_slice_and_per_source_parameters(zoo: Path, tmp_path: Path) -> None:
    """Two slices of different models: a source's weight beats the slice's gradient, which
    beats the recipe's; a one-layer slice sits at t = 1 under mergekit's conventions."""
    a, b, c, d = (zoo / n for n in ("math", "code", "chat", "base"))
    recipe = {
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                    {"model": str(b), "layer_range": [1, 3]},
                ],
                "parameters": {"weight": [1.0, 3.0]},
            },
            {
                "sources": [
                    {"model": str(c), "layer_range": [2, 3]},
                    {"model": str(d), "layer_range": [0, 1]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": [5.0, 4.0]}]},
            },
        ],
        "merge_method": "linear",
        "parameters": {"weight": 2.0},
        "conventions": "mergekit",
    }
    out = merge(tmp_path, recipe)
    sa, sb, sc, sd = (load_state(x) for x in (a, b, c, d))

    def mix(x: torch.Tensor, wx: float, y: torch.Tensor, wy: float) -> torch.Tensor:
        return (wx * x.double() + wy * y.double()) / (wx + wy)

    want = {}
    for name in sa:
        if not name.startswith(LAYER):
            if "embed" in name:  # first slice at t = 0: weights 1 (a's own) and 1
                want[name] = mix(sa[name], 1.0, sb[name], 1.0)
            else:  # last slice at t = 0: mlp filter absent, so the recipe's 2 and 2
                want[name] = mix(sc[name], 2.0, sd[name], 2.0)
            continue
        layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
        if layer == 0:  # slice 0, t = 0: a 1, b (its layer 1) 1
            want[name] = mix(sa[name], 1.0, sb[f"{LAYER}1.{rest}"], 1.0)
            want[f"{LAYER}1.{rest}"] = mix(sa[f"{LAYER}1.{rest}"], 1.0, sb[f"{LAYER}2.{rest}"], 3.0)
            w = 4.0 if "mlp" in rest else 2.0  # slice 1, one layer at t = 1
            want[f"{LAYER}2.{rest}"] = mix(sc[f"{LAYER}2.{rest}"], w, sd[name], w)
    assert_state(out, want, atol=1e-6)


def bad(zoo: Path, recipe: dict[str, Any]) -> MergeError:
    with pytest.raises(MergeError) as caught:
        mergecli.plan_merge(recipe_from_dict(recipe))
    return caught.value


def source(zoo: Path, name: str, start: int, stop: int, **extra: Any) -> dict[str, Any]:
    return {"model": str(zoo / name), "layer_range": [start, stop], **extra}


def test_bad_slices_name_their_key(zoo: Path) -> None:
    out_of_range = {
        "slices": [{"sources": [source(zoo, "math", 1, 4)]}],
        "merge_method": "passthrough",
    }
    err = bad(zoo, out_of_range)
    assert isinstance(err, RecipeError) and err.key == "slices[0].sources[0].layer_range"
    assert "3 layers" in str(err)
    empty = {"slices": [{"sources": [source(zoo, "math", 2, 2)]}], "merge_method": "passthrough"}
    assert bad(zoo, empty).key == "slices[0].sources[0].layer_range"
    mismatched = {
        "slices": [{"sources": [source(zoo, "math", 0, 2), source(zoo, "code", 0, 3)]}],
        "merge_method": "linear",
    }
    err = bad(zoo, mismatched)
    assert err.key == "slices[0].sources[1].layer_range" and "as many layers" in str(err)
    two = {
        "slices": [{"sources": [source(zoo, "math", 0, 2), source(zoo, "code", 0, 2)]}],
        "merge_method": "passthrough",
    }
    err = bad(zoo, two)
    assert err.key == "slices[0].sources" and "exactly 1" in str(err)
    uneven = {
        "slices": [
            {"sources": [source(zoo, "math", 0, 2), source(zoo, "code", 0, 2)]},
            {"sources": [source(zoo, "math", 2, 3)]},
        ],
        "merge_method": "linear",
    }
    assert bad(zoo, uneven).key == "slices[1].sources"
    no_base = {
        "slices": [{"sources": [source(zoo, "math", 0, 2), source(zoo, "code", 0, 2)]}],
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
    }
    assert bad(zoo, no_base).key == "base_model"
    unknown = {
        "slices": [{"sources": [source(zoo, "nowhere", 0, 2)]}],
        "merge_method": "passthrough",
    }
    assert isinstance(bad(zoo, unknown), SourceError)
    wrong_param = {
        "slices": [{"sources": [source(zoo, "math", 0, 2, parameters={"scael": 2})]}],
        "merge_method": "passthrough",
    }
    err = bad(zoo, wrong_param)
    assert err.key == "slices[0].sources[0].parameters.scael" and "scale" in str(err)


def test_bad_slice_recipes_fail_on_one_line(zoo: Path, tmp_path: Path) -> None:
    both = {
        "models": [{"model": str(zoo / "math")}],
        "slices": [{"sources": [source(zoo, "math", 0, 2)]}],
        "merge_method": "passthrough",
    }
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(both)
    assert caught.value.key == "slices"
    typo = {"slices": [{"sources": [{"model": "x", "layer_rnge": [0, 1]}]}], "merge_method": "x"}
    with pytest.raises(RecipeError, match="did you mean 'layer_range'") as caught:
        recipe_from_dict(typo)
    assert caught.value.key == "slices[0].sources[0].layer_rnge"
    union = {
        "slices": [{"sources": [source(zoo, "math", 0, 2)]}],
        "merge_method": "passthrough",
        "tokenizer_source": "union",
    }
    with pytest.raises(RecipeError, match="not supported with slices") as caught:
        recipe_from_dict(union)
    assert caught.value.key == "tokenizer_source"
    section = {**union, "tokenizer_source": None, "tokenizer": {"source": "union"}}
    with pytest.raises(RecipeError, match="not supported with slices") as caught:
        recipe_from_dict(section)
    assert caught.value.key == "tokenizer"
    path = write_recipe(
        tmp_path,
        {"slices": [{"sources": [source(zoo, "math", 0, 9)]}], "merge_method": "passthrough"},
    )
    result = run_cli("merge", str(path), "--dry-run")
    assert result.exit_code == 2
    assert "slices[0].sources[0].layer_range" in result.output
    assert "Traceback" not in result.output


def test_dry_run_shows_the_layer_map(zoo: Path, tmp_path: Path) -> None:
    recipe = {
        "slices": [
            {"sources": [source(zoo, "math", 0, 2)]},
            {"sources": [source(zoo, "code", 1, 3)]},
        ],
        "merge_method": "passthrough",
    }
    path = write_recipe(tmp_path, recipe)
    result = run_cli("merge", str(path), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [
        "0 ← slices[0]: math:0",
        "1 ← slices[0]: math:1",
        "2 ← slices[1]: code:1",
        "3 ← slices[1]: code:2",
    ]
    assert summary["tensors"] == 3 + 4 * 9


def test_defaults_warning_counts_values_set_in_slices(zoo: Path) -> None:
    """A per-model parameter set on every source (or on its slice) is not left to the default."""
    method = mergecli.get_method("dare_ties")
    density = {"parameters": {"density": 0.5}}

    def unset(on_sources: dict[str, Any]) -> list[str]:
        recipe = recipe_from_dict(
            {
                "slices": [
                    {"sources": [source(zoo, "base", 0, 2), source(zoo, "math", 0, 2)], **density},
                    {
                        "sources": [
                            source(zoo, "base", 2, 3, **on_sources),
                            source(zoo, "math", 2, 3, **on_sources),
                        ]
                    },
                ],
                "merge_method": "dare_ties",
                "base_model": str(zoo / "base"),
            }
        )
        return [p.name for p in unset_differing(recipe, method)]

    assert "density" in unset({})
    assert "density" not in unset(density)
