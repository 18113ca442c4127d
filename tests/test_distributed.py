"""Work on a Ray cluster (2 CPU workers started here): the same outputs and tables as local
runs, and a worker killed mid-task retried. Skipped where Ray is not installed or cannot start."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
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

# One Ray cluster per test run: scripts/test.sh runs the tests marked ray in one process of
# their own, after the others, so the cluster never shares the cores with other test workers.
pytestmark = [pytest.mark.slow, pytest.mark.ray]

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
    with pytest.raises(errors.RayError) as caught:  # cancelled, or its worker killed
        cluster.get(slow, timeout=50)  # type: ignore[attr-defined]
    assert not isinstance(caught.value, errors.GetTimeoutError), caught.value
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


def _close(a: object, b: object) -> bool:
    """Equal, floats to 1e-12 relative (float64 report sums add up in an order that depends on
    the thread count: Ray workers run one thread per CPU they were given)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    return a == b


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an output but the report (its timings differ from run to run)."""
    return {
        f.name: f.read_bytes()
        for f in sorted(folder.iterdir())
        if f.name not in ("merge_report.json", "merge_report.md")
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.7}},
        {"merge_method": "ties", "parameters": {"density": 0.3, "scope": "model"}},
    ],
    ids=["task_arithmetic", "ties_model_scope"],
)
def test_merge_on_ray_is_byte_identical(
    zoo: Path, tmp_path: Path, cluster: object, spec: dict
) -> None:
    from mergecli.distributed.merge import run_merge_on_ray
    from mergecli.engine.merge import run_merge
    from mergecli.engine.plan import plan_merge

    recipe = recipe_from_dict(
        {
            **spec,
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / n)} for n in ("math", "code", "chat")],
        }
    )
    plan = plan_merge(recipe, shard_size="40KB")
    local = run_merge(plan, tmp_path / "local")
    remote = run_merge_on_ray(
        plan_merge(recipe, shard_size="40KB"), tmp_path / "ray", RayExecutor(), "40KB"
    )
    shards = sorted((tmp_path / "local").glob("*.safetensors"))
    assert len(shards) >= 3
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _close(remote.report["tensors"], local.report["tensors"])
    assert _close(remote.report["totals"], local.report["totals"])
    placed = remote.report["run"]["executor"]
    assert [t["shard"] for t in placed["tasks"]] == [s.name for s in shards]
    assert placed["statistics"] == ("shards" if spec["merge_method"] == "ties" else "none")


def test_a_worker_killed_mid_merge_gives_the_same_output(tmp_path: Path, cluster: object) -> None:
    """A thread kills the first Ray worker of this test's cluster seen running a task once the
    merge's temporary folder exists; Ray runs that shard again and the folder is the local
    run's."""
    from mergecli.distributed.merge import run_merge_on_ray
    from mergecli.engine.merge import run_merge
    from mergecli.engine.plan import plan_merge
    from tests.helpers import write_random_experts

    write_random_experts(tmp_path, 12, (256, 512), 3, seed=5, varied=True)
    recipe = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / f"e{t}")} for t in range(3)],
            "parameters": {"density": 0.4},
        }
    )
    local = run_merge(plan_merge(recipe, shard_size="1MB"), tmp_path / "local")
    killed: list[int] = []
    stop = threading.Event()

    def kill_one() -> None:
        while not stop.is_set() and not killed:
            if any(p.name.startswith(".ray.mergecli-tmp") for p in tmp_path.iterdir()):
                for proc in psutil.Process().children(recursive=True):  # this test's cluster
                    title: list[str] = []
                    with contextlib.suppress(psutil.Error):
                        title = proc.cmdline()
                    if title and title[0].startswith("ray::_traced"):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.005)

    thread = threading.Thread(target=kill_one)
    thread.start()
    try:
        remote = run_merge_on_ray(
            plan_merge(recipe, shard_size="1MB"), tmp_path / "ray", RayExecutor(), "1MB"
        )
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was seen running a shard"
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _close(remote.report["tensors"], local.report["tensors"])


def test_flexmerge_on_ray_is_byte_identical(zoo5: Path, tmp_path: Path, cluster: object) -> None:
    """The similarity pass as one task per block; every size's artifact is the local one."""
    from mergecli.distributed.flex import similarity_on_ray
    from mergecli.flex import plan_flex, run_flex
    from tests.test_flex import recipe

    spec = recipe_from_dict(recipe(zoo5, "ties", flex={"granularity": "layer"}))
    overrides = {"sizes": [1.5, 3.0]}
    local = run_flex(plan_flex(spec, overrides), tmp_path / "local")
    similarity = similarity_on_ray(RayExecutor(), spec, overrides)
    remote = run_flex(plan_flex(spec, overrides), tmp_path / "ray", similarity=similarity)
    assert [np.asarray(g).tolist() for g in remote.grams] == [
        np.asarray(g).tolist() for g in local.grams
    ]
    for size in ("size-1.5", "size-3"):
        files = {
            f.name: f.read_bytes()
            for f in sorted((tmp_path / "local" / size).iterdir())
            if not f.name.startswith("flex_report")
        }
        assert files == {name: (tmp_path / "ray" / size / name).read_bytes() for name in files}, (
            size
        )
