"""Every output tensor of mergecli (``--conventions mergekit``) against mergekit 0.1.5's.

Not part of the tests: installs mergekit 0.1.5 into ``.bench/mergekit-venv`` (as
``scripts.bench_speed`` does), builds a tiny Llama base and three experts (float32) under
``.bench/compare``, runs both tools on each recipe of ``tests/mergekit_recipes`` unchanged (its
own dtype) and once more with ``dtype: float32``, and prints a markdown table: per recipe and
dtype, the largest absolute difference over every tensor and the largest difference counted
in bfloat16 steps (the spacing of bfloat16 at mergekit's value).

Tokenizer recipes: where the two output vocabularies give a token different ids, the
embedding and output-head rows are compared by token (the note says so).

Random masks (dare_ties, della) cannot agree entry by entry: their rows compare the fraction
of entries each tool changes from the base, and ``density: 1`` runs (no mask, in the recipe's
dtype and in float32) check the rest of the method exactly.

    python -m scripts.mergekit_compare [--only NAME ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from scripts.bench_speed import BENCH, ensure_mergekit
from scripts.fixtures import make_base, make_expert
from tests.test_mergekit_recipes import NAMES, RECIPES

ROOT = Path(__file__).resolve().parent.parent
WORK = BENCH / "compare"
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def zoo(dtype: torch.dtype) -> Path:
    """A tiny base and experts math, code and chat stored in ``dtype`` (built once)."""
    folder = WORK / f"zoo-{str(dtype).removeprefix('torch.')}"
    if not (folder / "chat").exists():
        shutil.rmtree(folder, ignore_errors=True)
        base = make_base(folder / "base", dtype=dtype)
        for i, name in enumerate(("math", "code", "chat")):
            make_expert(base, folder / name, seed=10 + i)
    return folder


def state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def bf16_steps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max abs(got − want) / the bfloat16 spacing at max(abs(got), abs(want)) (2^(e−7) in
    [2^e, 2^(e+1)))."""
    w = torch.maximum(got.double().abs(), want.double().abs()).clamp(min=2.0**-126)
    spacing = torch.exp2(torch.floor(torch.log2(w)) - 7)
    return float(((got.double() - want.double()).abs() / spacing).max())


def vocabulary(folder: Path) -> dict[str, int] | None:
    """The output tokenizer's token → id (added tokens included), None without one."""
    file = folder / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    return dict(Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True))


def by_token(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ours: Path, theirs: Path
) -> str:
    """Where the two output vocabularies give tokens different ids, the rows of the tensors
    indexed by token (embeddings, output head) reordered so that row i of both is one token;
    returns a note on the vocabularies ("" when they agree)."""
    va, vb = vocabulary(ours), vocabulary(theirs)
    if va is None or vb is None or va == vb:
        return "" if va == vb else "one output has no tokenizer"
    common = sorted(set(va) & set(vb), key=va.__getitem__)
    rows_a, rows_b = [va[t] for t in common], [vb[t] for t in common]
    for name in a:
        if name in b and ("embed_tokens" in name or "lm_head" in name):
            a[name], b[name] = a[name][rows_a], b[name][rows_b]
    only_a, only_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
    return (
        f"ids differ: compared by token over {len(common)} tokens"
        f"; only mergecli's: {only_a[:3]}; only mergekit's: {only_b[:3]}"
    )


def changed_fraction(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """Fraction of the entries that differ from the base (what a random mask keeps)."""
    total = changed = 0
    for name, tensor in merged.items():
        if name in base and tensor.is_floating_point():
            changed += int((tensor.float() != base[name].float()).sum())
            total += tensor.numel()
    return changed / max(total, 1)


def run_pair(name: str, text: str, tag: str, mergekit_yaml: Path) -> dict[str, object]:
    folder = WORK / "runs" / f"{name}-{tag}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(text)
    ours, theirs = folder / "mergecli", folder / "mergekit"
    cli = [sys.executable, "-m", "mergecli", "merge", str(recipe), "--output", str(ours)]
    subprocess.run([*cli, "--conventions", "mergekit", "--quiet"], check=True, cwd=ROOT)
    mk = [str(mergekit_yaml), str(recipe), str(theirs), "--quiet", "--random-seed", "0"]
    subprocess.run(mk, check=True)
    a, b = state(ours), state(theirs)
    vocab_note = by_token(a, b, ours, theirs)
    missing = sorted(set(a) ^ set(b))
    diff = max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b), default=0.0
    )
    steps = max((bf16_steps(a[k], b[k]) for k in a if k in b), default=0.0)
    row: dict[str, object] = {
        "recipe": name,
        "dtype": tag,
        "max_abs_diff": diff,
        "bf16_steps": steps,
    }
    if missing:
        row["missing"] = missing[:3]
    if vocab_note:
        row["vocabulary"] = vocab_note
    method = yaml.safe_load(text)["merge_method"]
    if method in RANDOM:
        base = state(Path(yaml.safe_load(text)["base_model"]))
        row["changed"] = (changed_fraction(a, base), changed_fraction(b, base))
    return row


def placed(text: str, folder: Path) -> str:
    """The recipe with its models in ``folder`` ($A, $B, $D experts, $C base)."""
    for key, sub in (("$A", "math"), ("$B", "code"), ("$C", "base"), ("$D", "chat")):
        text = text.replace(key, str(folder / sub))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--float32-only", action="store_true", help="skip the half-precision runs")
    args = parser.parse_args()
    mergekit_yaml = ensure_mergekit()
    rows = []
    for name in args.only or NAMES:
        raw = (RECIPES / f"{name}.yaml").read_text()
        half = yaml.safe_load(raw)["dtype"]
        data = yaml.safe_load(placed(raw, zoo(torch.float32)))
        variants = [
            (half, placed(raw, zoo(getattr(torch, half)))),
            ("float32", yaml.safe_dump({**data, "dtype": "float32"})),
        ]
        if args.float32_only:
            variants = variants[1:]
        if data["merge_method"] in RANDOM:
            native = yaml.safe_load(placed(raw, zoo(getattr(torch, half))))
            exact = [(half, native)] if not args.float32_only else []
            for tag, recipe in [*exact, ("float32", {**data, "dtype": "float32"})]:
                no_mask = {**recipe.get("parameters", {}), "density": 1.0}
                text = yaml.safe_dump({**recipe, "parameters": no_mask})
                variants.append((f"{tag}, density 1", text))
        for tag, variant in variants:
            row = run_pair(name, variant, tag.replace(", ", "-").replace(" ", ""), mergekit_yaml)
            row["dtype"] = tag
            rows.append(row)
            print(row, file=sys.stderr)
    print("| recipe | dtype | max abs diff | bf16 steps | changed entries mergecli / mergekit |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        changed = r.get("changed")
        note = f"{changed[0]:.4f} / {changed[1]:.4f}" if changed else ""  # type: ignore[index]
        if r.get("missing"):
            note += f" tensors only in one output: {r['missing']}"
        if r.get("vocabulary"):
            note += f" {r['vocabulary']}"
        diff, steps = f"{r['max_abs_diff']:.3g}", f"{r['bf16_steps']:.2f}"
        print(f"| {r['recipe']} | {r['dtype']} | {diff} | {steps} | {note} |")


if __name__ == "__main__":
    main()
