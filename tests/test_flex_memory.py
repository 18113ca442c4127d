"""FlexMerge's similarity pass streams like a merge: its peak memory is a merge's, not the model's.

As in ``test_analyze_memory``, each job runs in its own process while a thread samples the
anonymous resident memory (tensors, not the memory-mapped checkpoint files).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import peak_memory_job, write_random_experts

TENSORS, SHAPE, EXPERTS = 48, (128, 1024), 4
MIB = 1 << 20

pytestmark = pytest.mark.slow  # measures peak memory of a whole FlexMerge run

JOB = """
import json, sys
import mergecli
from mergecli.engine.runner import Runner
from mergecli.flex import plan_flex
from mergecli.flex.similarity import block_grams

recipe = mergecli.recipe.recipe_from_dict(json.loads(sys.argv[2]))
if sys.argv[1] == "merge":
    plan = mergecli.plan_merge(recipe)
    work = lambda: mergecli.run_merge(plan, sys.argv[3]) and None
else:
    plan = plan_flex(recipe, {"sizes": [2]})
    work = lambda: block_grams(plan.merge, plan.blocks, Runner()) and None
"""


def run_job(kind: str, recipe: dict, output: Path) -> int:
    return peak_memory_job(JOB, kind, json.dumps(recipe), str(output))["peak"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_similarity_pass_has_the_memory_of_a_merge(tmp_path: Path) -> None:
    write_random_experts(tmp_path, TENSORS, SHAPE, EXPERTS, seed=5, varied=False)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"e{t}")} for t in range(EXPERTS)],
        "flex": {"granularity": "tensor"},
    }
    merge = run_job("merge", recipe, tmp_path / "merged")
    similarity = run_job("similarity", recipe, tmp_path / "unused")
    task_vector_bytes = EXPERTS * TENSORS * math.prod(SHAPE) * 4
    assert similarity <= merge + 2 * MIB, (similarity, merge)
    assert similarity < task_vector_bytes / 4  # a few tensors at a time, not the model
