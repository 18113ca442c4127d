"""Work on a Ray cluster (2 CPU workers started here): the same outputs and tables as local
runs, and a worker killed mid-task retried. Skipped where Ray is not installed or cannot start."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mergecli.batch import load_batch, run_batch
from mergecli.distributed.executor import LocalExecutor, RayExecutor, executor_for
from mergecli.errors import MergeError
from mergecli.evaluate import Scorer
from mergecli.recipe import recipe_from_dict
from mergecli.sweep.grid import parse_grid
from mergecli.sweep.run import sweep_grid
from tests.helpers import ROOT, run_cli
from tests.test_batch import recipes, write_batch

pytestmark = pytest.mark.slow

SCORE = """import os, pathlib, signal, sys
from safetensors.numpy import load_file
once = pathlib.Path(sys.argv[2])
if sys.argv[2] != "-" and not once.exists():
    once.touch()
    os.kill(os.getppid(), signal.SIGKILL)  # the Ray worker running this evaluation
total = sum(float(abs(t).sum()) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors"))
            for t in load_file(f).values())
print(total)
"""


@pytest.fixture(scope="module")
def cluster() -> object:
    ray = pytest.importorskip("ray")
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    except Exception as exc:  # no shared memory, no ports: nothing to test here
        pytest.skip(f"Ray cannot start here: {exc}")
    yield ray
    ray.shutdown()


def _double(x: int) -> int:
    return 2 * x


def _add(a: int, b: int) -> int:
    return a + b


def test_tasks_come_back_in_order_with_where_they_ran(cluster: object) -> None:
    for executor in (LocalExecutor(), RayExecutor()):
        first = executor.submit(_double, 3)
        executor.submit(_add, first, 1)  # runs after the first, on its value
        executor.submit(_double, "x" * 0)
        done = list(executor.results())
        assert [d.value for d in done] == [6, 7, ""]
        assert all(d.error is None and d.where["pid"] for d in done)
    assert "node_id" in done[0].where


def test_stopping_early_cancels_the_rest(cluster: object) -> None:
    """What Ctrl-C does: the consumer of the results stops, the unfinished tasks are cancelled."""
    executor = RayExecutor()
    executor.submit(_double, 1)
    slow = executor.submit(time.sleep, 60)
    results = executor.results()
    assert next(results).value == 2
    started = time.monotonic()
    results.close()
    errors = cluster.exceptions  # type: ignore[attr-defined]
    with pytest.raises((errors.TaskCancelledError, errors.WorkerCrashedError)):
        cluster.get(slow, timeout=50)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 50


def test_batch_on_ray_writes_what_a_local_batch_writes(
    zoo: Path, tmp_path: Path, cluster: object
) -> None:
    path = write_batch(tmp_path, recipes(zoo, tmp_path / "hold"))
    local = run_batch(load_batch(path, tmp_path / "local"))
    remote = run_batch(load_batch(path, tmp_path / "ray"), executor=RayExecutor())
    assert [(o.name, o.status) for o in remote.outcomes] == [
        (o.name, o.status) for o in local.outcomes
    ]
    assert all(o.status == "ran" and "node_id" in o.where for o in remote.outcomes)
    for o in local.outcomes:
        files = sorted(Path(o.output).iterdir())
        assert [f.name for f in files] == sorted(
            p.name for p in (tmp_path / "ray" / o.name).iterdir()
        )
        for file in files:
            if file.suffix == ".safetensors" or file.name == "config.json":
                assert file.read_bytes() == (tmp_path / "ray" / o.name / file.name).read_bytes()
    again = run_batch(load_batch(path, tmp_path / "ray"), executor=RayExecutor())
    assert {o.status for o in again.outcomes} == {"skipped"}


def _sweep(zoo: Path, tmp_path: Path, once: str, executor=None) -> dict:
    script = tmp_path / "score.py"
    script.write_text(SCORE)
    recipe = recipe_from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n)} for n in ("math", "code", "chat")],
            "evaluate": {"command": f"{sys.executable} {script} {{model}} {once}"},
        }
    )
    scorer = Scorer(recipe, executor=executor)
    table, _ = sweep_grid(
        recipe, parse_grid(["lambda=0.5,1,1.5", "math.weight=0,1"], recipe), scorer
    )
    return table


def test_grid_sweep_on_ray_gives_the_local_table(
    zoo: Path, tmp_path: Path, cluster: object
) -> None:
    local = _sweep(zoo, tmp_path, "-")
    remote = _sweep(zoo, tmp_path, "-", RayExecutor())
    placed = remote.pop("executor")
    assert remote == local
    assert len(placed["tasks"]) == 6 and all("node_id" in t for t in placed["tasks"])


def test_a_worker_killed_mid_task_is_retried(zoo: Path, tmp_path: Path, cluster: object) -> None:
    once = tmp_path / "killed-once"
    local = _sweep(zoo, tmp_path, "-")
    remote = _sweep(zoo, tmp_path, str(once), RayExecutor())
    assert once.exists()  # one evaluation killed its worker; Ray ran it again
    remote.pop("executor")
    assert remote == local


def test_errors_in_tasks_come_back_as_one_line(zoo: Path, tmp_path: Path, cluster: object) -> None:
    recipe = recipe_from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(zoo / "math")}],
            "evaluate": {"command": f"{sys.executable} -c pass"},
        }
    )
    scorer = Scorer(recipe, executor=RayExecutor())
    with pytest.raises(MergeError, match=r"evaluate\.command"):
        list(scorer.each("model", [(zoo / "math",)]))


def test_evaluate_cli_on_ray(zoo: Path, tmp_path: Path, cluster: object) -> None:
    script = tmp_path / "score.py"
    script.write_text(SCORE)
    spec = {
        "merge_method": "linear",
        "models": [{"model": str(zoo / "math")}],
        "evaluate": {"command": f"{sys.executable} {script} {{model}} -"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(spec))
    args = ["evaluate", path, "--model", zoo / "math", "--model", zoo / "code", "--json"]
    local = json.loads(run_cli(*args).stdout)
    result = run_cli(*args, "--executor", "ray")
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    assert remote.pop("executor")["kind"] == "ray"
    assert remote == local


def test_executor_options_are_checked() -> None:
    with pytest.raises(MergeError, match="--address: only used with --executor ray"):
        executor_for("local", "auto")
    with pytest.raises(MergeError, match="--executor: expected one of local, ray, got 'dask'"):
        executor_for("dask")


def test_analysis_over_checkpoints_on_ray(tmp_path_factory, cluster: object) -> None:
    from mergecli.analyze import analyze_over_checkpoints
    from tests.test_analyze_checkpoints import runs, sweep_recipe

    root = runs.__wrapped__(tmp_path_factory)
    recipe = recipe_from_dict(sweep_recipe(root))
    local = analyze_over_checkpoints(recipe, match="fraction")
    remote = analyze_over_checkpoints(recipe, match="fraction", executor=RayExecutor())
    assert len(remote.pop("executor")["tasks"]) == len(local["points"]) == 5
    for point in [*local["points"], *remote["points"]]:  # measurements, not results
        del point["wall_s"], point["peak_rss_bytes"]
    assert remote == local
