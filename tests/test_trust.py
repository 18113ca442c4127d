"""No silent wrong output: non-finite values, out-of-range parameters, suspicious recipes,
concurrent runs, signals, stale temporary folders, full disks and start-up (issue 14)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecli.engine.checks import model_warnings
from mergecli.engine.finite import count_nonfinite
from mergecli.engine.output import output_lock, stale_folders
from mergecli.errors import NonFiniteError, OutputError
from mergecli.jsonsafe import strict_json
from mergecli.recipe import recipe_from_dict
from tests.helpers import ROOT, run_cli, run_module, write_random_experts, write_recipe

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A base and two experts of three 8×4 tensors each."""
    write_random_experts(tmp_path, 3, (8, 4), 2, seed=1, varied=False)
    return tmp_path


def recipe(root: Path, method: str = "task_arithmetic", **extra: object) -> Path:
    data = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "e0")}, {"model": str(root / "e1")}],
        "output": str(root / "out"),
        **extra,
    }
    return write_recipe(root, data)


def strict_load(text: str) -> object:
    def refuse(value: str) -> None:
        raise ValueError(f"non-strict JSON constant {value}")

    return json.loads(text, parse_constant=refuse)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".mergecli-" in p.name)


def poison(folder: Path, value: float) -> None:
    state = load_file(folder / "model.safetensors")
    state[NAME][2, 1] = value
    save_file(state, folder / "model.safetensors")


# -- finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_expert_is_an_error_naming_tensor_file_and_expert(
    small: Path, value: float
) -> None:
    poison(small / "e1", value)
    result = run_cli("merge", recipe(small))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "models[1].model" in line and NAME in line
    assert str(small / "e1" / "model.safetensors") in line and "on_nonfinite" in line
    assert not (small / "out").exists() and not leftovers(small)


def test_on_nonfinite_warn_merges_and_the_report_is_strict_json(small: Path) -> None:
    poison(small / "e1", float("nan"))
    result = run_cli("merge", recipe(small, on_nonfinite="warn"), "--json")
    assert result.exit_code == 0, result.output
    assert "holds 1 NaN/Inf value(s); merged anyway" in result.stderr
    summary = strict_load(result.stdout)
    report = strict_load((small / "out" / "merge_report.json").read_text())
    assert isinstance(summary, dict) and isinstance(report, dict)
    assert any("NaN/Inf" in w for w in report["plan"]["warnings"])
    assert any("written as null" in w for w in report["plan"]["warnings"])
    assert report["tensors"][NAME]["delta_norm"] is None


def test_merged_non_finite_is_an_error_naming_the_method(small: Path) -> None:
    path = recipe(small, parameters={"lambda": 1e39})  # finite inputs, an infinite merge
    result = run_cli("merge", path)
    assert result.exit_code == 2
    assert "task_arithmetic (merged)" in result.stderr and not (small / "out").exists()


def test_strict_json_nulls_non_finite_numbers_with_one_note() -> None:
    text, notes = strict_json({"a": [1.0, float("nan")], "b": {"c": float("-inf")}})
    assert strict_load(text) == {"a": [1.0, None], "b": {"c": None}}
    assert len(notes) == 1 and "2 non-finite numbers" in notes[0] and "a[1]" in notes[0]
    assert strict_json({"x": 1.5}) == ('{\n  "x": 1.5\n}', [])


def test_guard_error_type_carries_tensor_and_source(small: Path) -> None:
    import mergecli

    poison(small / "e0", float("nan"))
    plan = mergecli.plan_merge(mergecli.load_recipe(recipe(small)))
    with pytest.raises(NonFiniteError) as caught:
        mergecli.run_merge(plan, small / "out")
    assert caught.value.tensor == NAME and caught.value.source == "models[0].model"


# -- ranges and sanity --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "parameters", "key"),
    [
        ("ties", {"density": 1.5}, "parameters.density"),
        ("ties", {"density": -0.1}, "parameters.density"),
        ("ties", {"density": 0}, "parameters.density"),
        ("dare_ties", {"density": [0.5, 1.2]}, "parameters.density[1]"),
        ("breadcrumbs", {"gamma": 1.0}, "parameters.gamma"),
        ("della", {"epsilon": -0.1}, "parameters.epsilon"),
        ("pcb", {"ratio": 0}, "parameters.ratio"),
        ("ties", {"density": [{"filter": "mlp", "value": 2.0}]}, "parameters.density[0].value"),
    ],
)
def test_out_of_range_parameters_are_one_line_errors_with_the_key(
    small: Path, method: str, parameters: dict, key: str
) -> None:
    result = run_cli("merge", recipe(small, method, parameters=parameters))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(f"error: {key}:"), result.stderr
    assert "\n" not in result.stderr.strip()


def test_slerp_t_and_cross_parameter_rules(small: Path) -> None:
    slerp = run_cli("merge", recipe(small, "slerp", parameters={"t": 1.5}))
    assert slerp.exit_code == 2 and "parameters.t: t must lie in [0, 1]" in slerp.stderr
    crumbs = run_cli(
        "merge", recipe(small, "breadcrumbs", parameters={"density": 0.9, "gamma": 0.2})
    )
    assert crumbs.exit_code == 2 and "density + gamma ≤ 1" in crumbs.stderr
    della = run_cli("merge", recipe(small, "della", parameters={"density": 0.1, "epsilon": 0.2}))
    assert della.exit_code == 2 and "0 < density ± epsilon ≤ 1" in della.stderr


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_all_zero_weights_are_an_error(small: Path, method: str) -> None:
    result = run_cli("merge", recipe(small, method, parameters={"weight": 0}))
    assert result.exit_code == 2
    assert "models[].parameters.weight" in result.stderr and not (small / "out").exists()


def test_zero_weights_on_some_tensors_are_a_warning(small: Path) -> None:
    weight = [{"filter": "layers.0", "value": 0}, {"value": 1}]
    result = run_cli("merge", recipe(small, parameters={"weight": weight}))
    assert result.exit_code == 0, result.output
    assert "all weights are 0 for 1 tensors" in result.stderr


def test_suspicious_recipes_warn(small: Path) -> None:
    shutil.copytree(small / "e0", small / "runA" / "step-8")
    shutil.copytree(small / "e1", small / "runB" / "step-8")
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(small / "base"),
        "models": [
            {"model": str(small / "runA" / "step-8")},
            {"model": str(small / "runB" / "step-8")},
            {"model": str(small / "runA" / "step-8")},
            {"model": str(small / "base")},
        ],
        "output": str(small / "out"),
    }
    result = run_cli("merge", write_recipe(small, data), "--json")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "models[3].model is also the base_model" in err
    assert "models[2].model repeats models[0].model" in err
    assert "share the folder name 'step-8'" in err and "'runA/step-8' and 'runB/step-8'" in err
    report = json.loads((small / "out" / "merge_report.json").read_text())
    assert [i["role"] for i in report["inputs"]][1:3] == ["runA/step-8", "runB/step-8"]
    assert sum("share the folder name" in w for w in report["plan"]["warnings"]) == 1


def test_task_names_are_unique_by_one_rule() -> None:
    models = [
        {"model": "runA/step-8"},
        {"model": "runB/step-8"},
        {"model": "x/math"},
        {"model": "y/math", "name": "t"},
        {"model": "z", "name": "t"},
        {"model": "x/math"},
    ]
    recipe = recipe_from_dict({"merge_method": "linear", "models": models})
    assert recipe.task_names() == ["runA/step-8", "runB/step-8", "math", "t", "t#4", "math#5"]
    notes = model_warnings(recipe)
    assert any("models[4].name 't' is also the name of models[3]" in n for n in notes)


def test_tokenizer_source_must_be_base_union_or_a_folder(small: Path) -> None:
    result = run_cli("merge", recipe(small, tokenizer_source="no/such/folder"))
    assert result.exit_code == 2 and "tokenizer_source:" in result.stderr
    assert "no/such/folder" in result.stderr and "Traceback" not in result.output


def test_adapter_of_another_base_warns(tmp_path: Path) -> None:
    from scripts.fixtures import make_adapter, make_base
    from tests.conftest import ADAPTERS

    base = make_base(tmp_path / "base")
    other = make_base(tmp_path / "other", seed=5)
    adapter = make_adapter(other, tmp_path / "adapter", ADAPTERS["lora8"], seed=3)
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(adapter)}],
        "output": str(tmp_path / "out"),
    }
    result = run_cli("merge", write_recipe(tmp_path, data), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "models[0].model: adapter trained on" in result.stderr
    assert str(other) in result.stderr


# -- output safety ------------------------------------------------------------------------


def test_second_run_into_a_locked_output_fails_at_once_naming_the_pid(small: Path) -> None:
    with output_lock(small / "out"):
        started = time.perf_counter()
        result = run_cli("merge", recipe(small))
        assert time.perf_counter() - started < 30
    assert result.exit_code == 2
    assert (
        f"another mergecli run (pid {os.getpid()})" in result.stderr and "--wait" in result.stderr
    )
    assert not (small / "out").exists()


def test_lock_is_an_output_error_and_is_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with output_lock(target), pytest.raises(OutputError) as caught, output_lock(target):
        pass
    assert caught.value.path == target and not list(target.parent.iterdir())


def test_wait_waits_for_the_running_one(small: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with output_lock(small / "out"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    threading.Timer(1.0, release.set).start()
    result = run_cli("merge", recipe(small), "--wait", "--quiet")
    holder.join()
    assert result.exit_code == 0, result.output
    assert (small / "out" / "model.safetensors").is_file() and not leftovers(small)


def dead_pid() -> int:
    """The PID of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


def test_scratch_folders_of_dead_processes_are_removed(tmp_path: Path, monkeypatch) -> None:
    import socket
    import tempfile

    from mergecli.engine.scratch import scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f"mergecli-eval-{host}-{dead_pid()}-ab12cd_x"
    mine = tmp_path / f"mergecli-eval-{host}-{os.getpid()}-zz9"
    elsewhere = tmp_path / f"mergecli-eval-otherhost-{dead_pid()}-q1"
    for folder in (dead, mine, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    listed = run_cli("cleanup", tmp_path / "outputs", "--json")
    assert json.loads(listed.stdout)["stale"] == [str(dead)] and dead.exists()
    with scratch_folder("eval") as folder:
        assert folder.parent == tmp_path and folder.is_dir() and str(os.getpid()) in folder.name
        assert not dead.exists() and mine.exists() and elsewhere.exists()
    assert not folder.exists()


def test_stale_folders_are_listed_cleaned_and_removed_by_the_next_run(
    small: Path, tmp_path: Path, monkeypatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no scratch folders listed
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(dead.stdout)
    stale = small / f".out.mergecli-tmp-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = small / f".elsewhere.mergecli-tmp-{pid}"
    other.mkdir()
    assert stale_folders(small) == [other, stale]
    listed = run_cli("cleanup", small)
    assert listed.exit_code == 0 and f"stale: {stale}" in listed.stdout and stale.exists()
    assert run_cli("merge", recipe(small), "--quiet").exit_code == 0
    assert not stale.exists() and other.exists()  # the run cleans its own target only
    removed = run_cli("cleanup", small, "--remove", "--json")
    assert json.loads(removed.stdout)["removed"] == [str(other)] and not other.exists()


def test_free_space_is_checked_before_writing(small: Path, monkeypatch) -> None:
    import mergecli.engine.output as output

    usage = shutil.disk_usage(small)
    monkeypatch.setattr(output.shutil, "disk_usage", lambda _p: usage._replace(free=100))
    result = run_cli("merge", recipe(small))
    assert result.exit_code == 2
    assert "needs" in result.stderr and "only 100 are free" in result.stderr
    assert not (small / "out").exists() and not leftovers(small)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_on_the_output_name_the_path(small: Path, monkeypatch, code: int) -> None:
    from mergecli.engine.writer import ShardWriter

    def fail(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        raise OSError(code, os.strerror(code), str(self.folder / "model.safetensors"))

    monkeypatch.setattr(ShardWriter, "write", fail)
    result = run_cli("merge", recipe(small))
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.stderr and os.strerror(code) in result.stderr
    assert ".out.mergecli-tmp-" in result.stderr and not leftovers(small)


SIGNAL_SCRIPT = """
import os, signal, sys
from mergecli.engine.writer import ShardWriter
original, signum = ShardWriter.write, getattr(signal, sys.argv[1])
def write(self, name, tensor):
    os.kill(os.getpid(), signum)
    original(self, name, tensor)
ShardWriter.write = write
sys.argv = ["mergecli", "merge", sys.argv[2], "--quiet"]
from mergecli.cli import main
main()
"""


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_mid_merge_give_one_line_and_leave_nothing(
    small: Path, name: str, code: int
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_SCRIPT, name, str(recipe(small))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), done.stderr
    assert not (small / "out").exists() and not leftovers(small)


REPEAT_SCRIPT = """
import os, shutil, signal, sys
import mergecli.engine.output as output
from mergecli.engine.writer import ShardWriter
original_write, original_rmtree = ShardWriter.write, shutil.rmtree
def write(self, name, tensor):
    os.kill(os.getpid(), signal.SIGINT)
    original_write(self, name, tensor)
def rmtree(path, *args, **kwargs):  # the cleanup the first signal started meets a second one
    os.kill(os.getpid(), signal.SIGTERM)
    original_rmtree(path, *args, **kwargs)
ShardWriter.write = write
output.shutil = type(shutil)("shutil_with_a_second_signal")
output.shutil.__dict__.update({**vars(shutil), "rmtree": rmtree})
sys.argv = ["mergecli", "merge", sys.argv[1], "--quiet"]
from mergecli.cli import main
main()
"""


def test_a_second_signal_during_cleanup_lets_the_cleanup_finish(small: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", REPEAT_SCRIPT, str(recipe(small))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["interrupted (SIGINT); the output was not written"]
    assert not (small / "out").exists() and not leftovers(small)


def test_ctrl_c_during_start_up_is_one_line() -> None:
    script = (  # the signal arrives while the entry point imports the CLI
        "import os, signal, time\nimport mergecli.cli as cli, mergecli.entry as entry\n"
        "cli.main = lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5))\n"
        "entry.main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 130 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr


# -- start-up -----------------------------------------------------------------------------

HELP_SCRIPT = """
import sys
from mergecli.cli import app
import typer.main
commands = [[]]
group = typer.main.get_group(app)
for name, command in group.commands.items():
    commands.append([name])
    for sub in getattr(command, "commands", {}):
        commands.append([name, sub])
for args in commands:
    try:
        app([*args, "--help"])
    except SystemExit:
        pass
try:
    app(["--version"])
except SystemExit:
    pass
numba = "NUMBA" if "numba" in sys.modules else "NO-NUMBA"
print("TORCH" if "torch" in sys.modules else "NO-TORCH", len(commands), numba, file=sys.stderr)
"""


def test_help_and_version_do_not_import_torch_or_numba() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], env=env, capture_output=True, text=True, check=False
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH"), done.stderr[-2000:]
    assert int(last.split()[1]) > 10  # every command and subcommand was asked for help
    assert last.split()[2] == "NO-NUMBA", done.stderr[-2000:]


# -- reports --------------------------------------------------------------------------------


def test_two_runs_give_reports_identical_but_for_run(small: Path) -> None:
    path = recipe(small)
    assert run_cli("merge", path, "--quiet").exit_code == 0
    assert run_cli("merge", path, "--quiet", "--output", small / "again").exit_code == 0
    first = json.loads((small / "out" / "merge_report.json").read_text())
    second = json.loads((small / "again" / "merge_report.json").read_text())
    assert first["run"]["output"] != second["run"]["output"]
    assert {k: v for k, v in first.items() if k != "run"} == {
        k: v for k, v in second.items() if k != "run"
    }
    assert {"timing", "peak_rss_bytes", "host", "inputs", "output", "device"} <= set(first["run"])


def test_version_runs_as_a_module() -> None:
    done = run_module("--version")
    assert done.returncode == 0 and done.stdout.startswith("mergecli ")


def test_folder_run_leaves_the_old_output_on_error_and_replaces_it_on_success(
    tmp_path: Path,
) -> None:
    from mergecli.engine.folder_run import folder_run

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="--force"), folder_run(target):
        pass
    with pytest.raises(RuntimeError, match="boom"), folder_run(target, force=True) as run:
        assert run.folder.parent == tmp_path and run.folder != target
        (run.folder / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with folder_run(target, force=True) as run:
        (run.folder / "new.txt").write_text("new")
    assert run.output == target.resolve() and run.wall >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_count_nonfinite_exact_and_not_fooled_by_an_overflowing_sum(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    finite = torch.full((4096,), big / 2, dtype=dtype)  # finite entries whose sum overflows
    assert torch.isinf(finite.sum(dtype=torch.float64).to(dtype))
    assert count_nonfinite(finite) == 0
    x = torch.randn(10_000).to(dtype)
    assert count_nonfinite(x) == 0
    x[[3, 70, 9000]] = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(dtype)
    assert count_nonfinite(x) == 3
    y = torch.randn(10_000).to(dtype)
    y[[5, 6]] = torch.tensor([float("inf"), float("-inf")]).to(dtype)  # the sum is NaN
    assert count_nonfinite(y) == 2
    assert count_nonfinite(torch.arange(5)) == 0
