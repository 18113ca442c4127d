"""FlexMerge's cost: every size of 8 experts against one task-arithmetic merge of the same inputs.

``python -m scripts.bench_flex [--layers 4] [--experts 8] [--sizes 1,2,...,8] [--repeat 3]``
generates Llama-shaped bfloat16 checkpoints (a base and the experts) under ``.bench/flex``, then
times, in this process and best of ``--repeat``, ``mergecli merge`` with task arithmetic
(``normalize: true``, λ = 1.5, FlexMerge's TA) and ``mergecli flex`` writing one artifact per
size (default every whole size 1..M) from one similarity pass and one merge order. It prints
both times and their ratio (the paper reports 2.3 s / 0.8 s ≈ 2.9 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import mergecli
from mergecli.flex import plan_flex, run_flex
from mergecli.recipe import recipe_from_dict
from scripts.llama_checkpoints import LlamaShape, write_family

ROOT = Path(".bench/flex")


def best_of(repeat: int, run, output: Path) -> float:
    """The shortest wall time of ``repeat`` runs, each into a fresh ``output``."""
    times = []
    for _ in range(repeat):
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--sizes", default=None, help="comma-separated (default 1..M)")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = ROOT / f"layers{args.layers}-experts{args.experts}"
    base, experts = write_family(root, LlamaShape(layers=args.layers), args.experts)
    params = {"normalize": True, "lambda": 1.5} if args.method == "task_arithmetic" else {}
    recipe = recipe_from_dict(
        {
            "merge_method": args.method,
            "base_model": str(base),
            "models": [{"model": str(e)} for e in experts],
            "parameters": params,
        }
    )
    sizes = (
        [float(s) for s in args.sizes.split(",")]
        if args.sizes
        else [float(s) for s in range(1, args.experts + 1)]
    )
    out = root / "out"

    def merge() -> None:
        mergecli.run_merge(mergecli.plan_merge(recipe, args.device), out / "merged", force=True)

    timings: dict[str, float] = {}

    def flex() -> None:
        plan = plan_flex(recipe, {"sizes": sizes}, device=args.device)
        timings.update(run_flex(plan, out / "flex", force=True).timing)

    merge()  # warm the page cache and the imports
    merge_s = best_of(args.repeat, merge, out / "merged")
    flex_s = best_of(args.repeat, flex, out / "flex")
    shutil.rmtree(out, ignore_errors=True)
    row = {
        "experts": args.experts,
        "layers": args.layers,
        "model_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors")),
        "sizes": sizes,
        "merge_s": merge_s,
        "flex_all_sizes_s": flex_s,
        "ratio": flex_s / merge_s,
        "flex_phases_s": timings,
    }
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(
            f"{args.experts} experts, {args.layers} layers: task arithmetic {merge_s:.2f} s, "
            f"FlexMerge sizes {','.join(f'{s:g}' for s in sizes)} {flex_s:.2f} s, "
            f"ratio {flex_s / merge_s:.2f}"
        )


if __name__ == "__main__":
    main()
