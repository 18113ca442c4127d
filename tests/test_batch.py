"""Batches of recipes: dependency order, resuming after a kill, failures stopping dependants."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mergecli.batch import RunOptions, load_batch, run_batch
from mergecli.batch.run import MARKER, preview
from mergecli.errors import MergeError
from tests.helpers import ROOT, load_state, run_cli

HOLD = """import pathlib, sys, time
pathlib.Path(sys.argv[2]).touch()
while pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
print(1.0)
"""


def recipes(zoo: Path, hold: Path) -> list[dict]:
    """Four recipes; ``stacked`` uses ``soup``'s output; ``picky`` (a greedy soup) scores its
    experts with a command that waits while the file ``hold`` exists."""
    script = hold.parent / "hold.py"
    script.write_text(HOLD)
    command = f"{sys.executable} {script} {hold} {hold.parent / 'reached'} {{model}}"
    return [
        {
            "name": "soup",
            "merge_method": "linear",
            "models": [{"model": str(zoo / "math")}, {"model": str(zoo / "code")}],
        },
        {
            "name": "stacked",
            "merge_method": "task_arithmetic",
            "base_model": str(zoo / "base"),
            "models": [{"model": "soup"}, {"model": str(zoo / "chat")}],
            "parameters": {"lambda": 0.5},
        },
        {
            "name": "ties",
            "merge_method": "ties",
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / "math")}, {"model": str(zoo / "chat")}],
            "parameters": {"density": 0.5, "scope": "tensor"},
        },
        {
            "name": "picky",
            "merge_method": "greedy_soup",
            "models": [{"model": str(zoo / "code")}, {"model": str(zoo / "chat")}],
            "evaluate": {"command": command, "tasks": ["code"]},
        },
    ]


def write_batch(folder: Path, docs: list[dict]) -> Path:
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_order_names_and_outputs(zoo: Path, tmp_path: Path) -> None:
    docs = recipes(zoo, tmp_path / "hold")
    docs.insert(0, docs.pop(1))  # stacked first in the file: it still runs after soup
    batch = load_batch(write_batch(tmp_path, docs), tmp_path / "out")
    assert [r.name for r in batch.recipes] == ["soup", "stacked", "ties", "picky"]
    stacked = batch.get("stacked")
    assert stacked.needs == ("soup",)
    assert stacked.recipe.models[0].model == str(tmp_path / "out" / "soup")
    assert batch.dependants("soup") == ["stacked"]
    assert [r["action"] for r in preview(batch)] == ["run"] * 4


def test_slice_sources_name_other_recipes(zoo: Path, tmp_path: Path) -> None:
    deep = {
        "name": "deep",
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo / "math"), "layer_range": [0, 2]}]},
            {"sources": [{"model": "soup", "layer_range": [1, 3]}], "base_model": "soup"},
        ],
    }
    soup = recipes(zoo, tmp_path / "hold")[0]
    batch = load_batch(write_batch(tmp_path, [deep, soup]), tmp_path / "out")
    assert [r.name for r in batch.recipes] == ["soup", "deep"]
    deep = batch.get("deep").recipe.slices
    assert deep is not None and deep[1].sources[0].model == str(tmp_path / "out" / "soup")
    assert deep[1].base_model == str(tmp_path / "out" / "soup")
    assert deep[0].sources[0].model == str(zoo / "math")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[0].update(models=[{"model": "stacked"}]), "cycle: soup → stacked → soup"),
        (lambda d: d[2].update(name="soup"), "'soup' twice"),
        (lambda d: d[2].pop("name"), "needs 'output'"),
        (lambda d: d[2].update(densty=1), "recipe 'ties': unknown key 'densty'"),
        (lambda d: d[2].update(output="out/soup"), "both write to"),
    ],
)
def test_bad_batches_are_one_line_errors(zoo: Path, tmp_path: Path, change, message) -> None:
    docs = recipes(zoo, tmp_path / "hold")
    change(docs)
    path = write_batch(tmp_path, docs)
    with pytest.raises(MergeError, match=message.replace("(", r"\(")):
        load_batch(path, tmp_path / "out")
    result = run_cli("batch", path, "-I", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unnamed_recipe_is_the_final_merge(zoo: Path, tmp_path: Path) -> None:
    docs = recipes(zoo, tmp_path / "hold")[:2]
    docs[1].pop("name")
    batch = load_batch(write_batch(tmp_path, docs), tmp_path / "mid", tmp_path / "final")
    assert batch.get("final").output == tmp_path / "final"


def test_batch_of_four_resumes_after_a_kill(zoo: Path, tmp_path: Path) -> None:
    """Killed while the last recipe runs, the batch resumes without redoing the three done."""
    hold = tmp_path / "hold"
    hold.touch()
    path = write_batch(tmp_path, recipes(zoo, hold))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergecli", "batch", str(path), "-I", str(out), "--quiet"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "reached").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {n: (out / n / MARKER).stat().st_mtime_ns for n in ("soup", "stacked", "ties")}
    assert not (out / "picky").exists()
    hold.unlink()

    batch = load_batch(path, out)
    assert [r["action"] for r in preview(batch)] == ["skip", "skip", "skip", "run"]
    result = run_batch(batch)
    assert [(o.name, o.status) for o in result.outcomes] == [
        ("soup", "skipped"),
        ("stacked", "skipped"),
        ("ties", "skipped"),
        ("picky", "ran"),
    ]
    assert {n: (out / n / MARKER).stat().st_mtime_ns for n in done} == done
    assert json.loads((out / "picky" / MARKER).read_text())["name"] == "picky"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # the same batch from scratch writes the same bytes
    fresh = run_batch(load_batch(path, tmp_path / "fresh"))
    assert not fresh.failed
    for name in done:
        for file in sorted((out / name).glob("*.safetensors")):
            assert file.read_bytes() == (tmp_path / "fresh" / name / file.name).read_bytes()


def test_failure_stops_only_its_dependants(zoo: Path, tmp_path: Path) -> None:
    docs = recipes(zoo, tmp_path / "hold")
    docs[0]["models"][1]["model"] = str(zoo / "missing")
    path = write_batch(tmp_path, docs)
    result = run_cli("batch", path, "-I", tmp_path / "out", "--json")
    assert result.exit_code == 2
    summary = json.loads(result.stdout)
    status = {r["name"]: r["status"] for r in summary["recipes"]}
    assert status == {"soup": "failed", "stacked": "blocked", "ties": "ran", "picky": "ran"}
    assert summary["counts"] == {"ran": 2, "skipped": 0, "failed": 1, "blocked": 1}
    assert "missing" in summary["recipes"][0]["error"]
    assert "needs soup" in summary["recipes"][1]["error"]
    assert not (tmp_path / "out" / "soup").exists()


def test_changed_recipe_reruns_it_and_its_dependants(zoo: Path, tmp_path: Path) -> None:
    docs = recipes(zoo, tmp_path / "hold")[:3]
    out = tmp_path / "out"
    assert not run_batch(load_batch(write_batch(tmp_path, docs), out)).failed
    before = load_state(out / "stacked")
    docs[0]["models"][1]["parameters"] = {"weight": 3.0}
    result = run_batch(load_batch(write_batch(tmp_path, docs), out))
    assert [o.status for o in result.outcomes] == ["ran", "ran", "skipped"]
    after = load_state(out / "stacked")
    assert any(not before[k].equal(after[k]) for k in before)


def test_output_not_written_by_a_batch_needs_force(zoo: Path, tmp_path: Path) -> None:
    docs = recipes(zoo, tmp_path / "hold")[2:3]
    out = tmp_path / "out"
    (out / "ties").mkdir(parents=True)
    (out / "ties" / "mine.txt").write_text("keep")
    batch = load_batch(write_batch(tmp_path, docs), out)
    [outcome] = run_batch(batch).outcomes
    assert outcome.status == "failed" and "--force" in (outcome.error or "")
    assert (out / "ties" / "mine.txt").exists()
    [outcome] = run_batch(batch, RunOptions(force=True)).outcomes
    assert outcome.status == "ran" and not (out / "ties" / "mine.txt").exists()


def test_dry_run_prints_the_graph(zoo: Path, tmp_path: Path) -> None:
    path = write_batch(tmp_path, recipes(zoo, tmp_path / "hold"))
    result = run_cli("batch", path, "-I", tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["recipes"]
    assert [(r["name"], r["needs"], r["action"]) for r in rows] == [
        ("soup", [], "run"),
        ("stacked", ["soup"], "run"),
        ("ties", [], "run"),
        ("picky", [], "run"),
    ]
    assert not (tmp_path / "out").exists()


def test_a_concurrent_writer_of_an_output_fails_the_recipe_or_is_waited_for(
    zoo: Path, tmp_path: Path
) -> None:
    from mergecli.engine.output import output_lock

    docs = recipes(zoo, tmp_path / "hold")[2:3]
    out = tmp_path / "out"
    batch = load_batch(write_batch(tmp_path, docs), out)
    with output_lock(out / "ties"):  # another run is writing it
        [outcome] = run_batch(batch).outcomes
    assert outcome.status == "failed" and "being written by another mergecli run" in (
        outcome.error or ""
    )
    assert not (out / "ties").exists()

    done_elsewhere = tmp_path / "elsewhere"
    assert run_batch(load_batch(write_batch(tmp_path, docs), done_elsewhere)).outcomes[0].ok
    outcomes: list = []
    waiting = threading.Thread(
        target=lambda: outcomes.extend(run_batch(batch, RunOptions(wait=True)).outcomes)
    )
    with output_lock(out / "ties"):  # another run is writing it ...
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not outcomes  # ... and the batch waits for it
        shutil.copytree(done_elsewhere / "ties", out / "ties")  # which completes the output
    waiting.join()
    # found complete for the same fingerprint once the other writer was done
    assert outcomes[0].status == "skipped", outcomes[0].error
