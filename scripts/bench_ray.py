"""Speed-up of a sweep on a local Ray cluster with 1, 2 and 4 workers (docs/distributed.md).

A task-arithmetic sweep over K grid points on random experts, each candidate merged into a
temporary folder and scored by a command that reads every tensor back; timed with the local
executor and with Ray clusters of 1, 2 and 4 CPU workers (the cluster's start is not timed).

    .venv/bin/python -m scripts.bench_ray [--out FOLDER] [--points 8] [--tensors 16] [--dim 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mergecli.distributed.executor import RayExecutor
from mergecli.evaluate import Scorer
from mergecli.recipe import recipe_from_dict
from mergecli.sweep.grid import parse_grid
from mergecli.sweep.run import sweep_grid
from tests.helpers import ROOT, write_random_experts

SCORE = """import pathlib, sys
from safetensors.numpy import load_file
print(sum(float(abs(t).sum()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors"))
          for t in load_file(f).values()))
"""


def sweep_seconds(root: Path, points: int, executor: RayExecutor | None) -> tuple[float, dict]:
    recipe = recipe_from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(root / "base"),
            "models": [{"model": str(root / f"e{t}")} for t in range(3)],
            "evaluate": {"command": f"{sys.executable} {root / 'score.py'} {{model}}"},
        }
    )
    axes = parse_grid([f"lambda={','.join(str(0.1 * (k + 1)) for k in range(points))}"], recipe)
    start = time.perf_counter()
    table, _ = sweep_grid(recipe, axes, Scorer(recipe, executor=executor))
    table.pop("executor", None)
    return time.perf_counter() - start, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write bench_ray.json and .png here")
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="mergecli-bench-ray-") as tmp:
        root = Path(tmp)
        write_random_experts(root, args.tensors, (args.dim, args.dim), 3, seed=0, varied=False)
        (root / "score.py").write_text(SCORE)
        sweep_seconds(root, 1, None)  # imports and first reads (not timed), as for Ray below
        local, reference = sweep_seconds(root, args.points, None)
        rows = [{"workers": 0, "label": "local", "seconds": local}]
        for workers in (1, 2, 4):
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            )
            sweep_seconds(root, workers, RayExecutor())  # start the workers (not timed)
            seconds, table = sweep_seconds(root, args.points, RayExecutor())
            ray.shutdown()
            assert table == reference, "the Ray sweep's table differs from the local one"
            rows.append({"workers": workers, "label": f"ray ×{workers}", "seconds": seconds})
    for row in rows:
        row["speedup"] = local / row["seconds"]
        print(f"{row['label']:>8}: {row['seconds']:7.2f} s  speed-up {row['speedup']:.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"points": args.points, "tensors": args.tensors, "dim": args.dim, "rows": rows}
        (args.out / "bench_ray.json").write_text(json.dumps(result, indent=2) + "\n")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([r["label"] for r in rows], [r["speedup"] for r in rows], color="#4c72b0")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_ylabel("speed-up over local")
        ax.set_title(f"sweep of {args.points} candidates ({args.tensors}×{args.dim}² per model)")
        fig.tight_layout()
        fig.savefig(args.out / "bench_ray.png", dpi=120)


if __name__ == "__main__":
    main()
