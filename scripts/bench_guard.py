"""The finite-value guard's cost: CPU time spent in it against the whole merge's.

    python -m scripts.bench_guard [METHOD ...]   (default: task_arithmetic ties linear)

A base and three experts of 16 float32 tensors of 1024 × 1024 (64 MiB a model), merged three
times per method; the run where the guard's share is smallest is printed (the least disturbed
by other work on the machine).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import mergecli
import mergecli.engine.finite as finite
import mergecli.engine.merge as merge
import mergecli.engine.runner as runner
from mergecli.recipe import recipe_from_dict
from tests.helpers import write_random_experts


def main() -> None:
    methods = sys.argv[1:] or ["task_arithmetic", "ties", "linear"]
    spent = [0.0, 0]
    guard = finite.check_finite

    def timed(t: torch.Tensor, *args: object) -> None:
        start = time.thread_time()
        guard(t, *args)  # type: ignore[arg-type]
        spent[0] += time.thread_time() - start
        spent[1] += t.nbytes

    runner.check_finite = merge.check_finite = timed  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_random_experts(root, 16, (1024, 1024), 3, seed=0, varied=False)
        models = [{"model": str(root / f"e{i}")} for i in range(3)]
        for method in methods:
            recipe = recipe_from_dict(
                {"merge_method": method, "base_model": str(root / "base"), "models": models}
            )
            runs = []
            for _ in range(3):
                spent[:] = [0.0, 0]
                plan = mergecli.plan_merge(recipe)
                start = time.process_time()
                mergecli.run_merge(plan, root / "out", force=True)
                total = time.process_time() - start
                runs.append((spent[0] / total, spent[0], total, spent[1]))
            share, seconds, total, checked = min(runs)
            print(
                f"{method}: guard {seconds:.3f} s CPU of {total:.2f} s CPU for the merge "
                f"({100 * share:.1f} %), {checked / 2**20:.0f} MiB checked"
            )


if __name__ == "__main__":
    main()
