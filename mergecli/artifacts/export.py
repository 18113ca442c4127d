"""Write one task of an artifact as a standard Hugging Face checkpoint folder, on the runner."""

from __future__ import annotations

from pathlib import Path

from mergecli.artifacts import Artifact, check_task
from mergecli.artifacts.source import TaskSource
from mergecli.engine.folder_run import folder_run
from mergecli.engine.layout import parse_size, plan_shards
from mergecli.engine.outputs import Target, TensorCopies
from mergecli.engine.read_plan import ReadPlan, TensorPlan
from mergecli.engine.store import Store
from mergecli.progress import Progress


def export_task(
    artifact: Artifact,
    task: str,
    output: str | Path,
    force: bool = False,
    shard_size: str | int = "5GB",
    progress: Progress | None = None,
    wait: bool = False,
) -> Path:
    """Stream one task's tensors into ``output`` (atomically, under its lock); returns the
    folder."""
    check_task(artifact, task)
    tensors = [
        TensorPlan(name, *artifact.tensor_spec(name), merge=False)
        for name in artifact.tensor_names()
    ]
    shards = plan_shards([(t.name, t.shape, t.out_dtype) for t in tensors], parse_size(shard_size))
    dtypes = [t.out_dtype for t in tensors if t.out_dtype.is_floating_point]
    copies = TensorCopies(shards, {"mergecli_task": task})
    files = artifact.model_files()
    target = Target(max(set(dtypes), key=dtypes.count), files, files)
    with folder_run(output, force, wait, copies.nbytes, progress) as run:
        writer = copies.open(run.folder, target)
        read = ReadPlan.copies(tensors, TaskSource(artifact, task))
        run.runner.run(read, [Store(writer, run.runner.timer)], f"exporting {task}")
        writer.finish({})
    return run.output
