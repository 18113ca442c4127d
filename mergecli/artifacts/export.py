"""Write one task of an artifact as a standard Hugging Face checkpoint folder, on the runner."""

from __future__ import annotations

from pathlib import Path

from mergecli.artifacts import Artifact, check_task
from mergecli.artifacts.source import TaskSource
from mergecli.engine.layout import parse_size, plan_shards
from mergecli.engine.output import atomic_folder, copy_model_files
from mergecli.engine.outputs import CopyWriter
from mergecli.engine.read_plan import ReadPlan, TensorPlan
from mergecli.engine.runner import Runner
from mergecli.engine.store import Store
from mergecli.engine.writer import ShardWriter
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
    output = Path(output).resolve()
    tensors = [
        TensorPlan(name, *artifact.tensor_spec(name), merge=False)
        for name in artifact.tensor_names()
    ]
    shards = plan_shards([(t.name, t.shape, t.out_dtype) for t in tensors], parse_size(shard_size))
    dtypes = [t.out_dtype for t in tensors if t.out_dtype.is_floating_point]
    runner = Runner(progress)
    with atomic_folder(output, force, wait, sum(s.nbytes for s in shards)) as folder:
        writer = CopyWriter(ShardWriter(folder, shards, {"mergecli_task": task}), folder)
        read = ReadPlan.copies(tensors, TaskSource(artifact, task))
        runner.run(read, [Store(writer, runner.timer)], f"exporting {task}")
        writer.finish({})
        files = artifact.model_files()
        copy_model_files(files, files, folder, max(set(dtypes), key=dtypes.count))
    runner.progress.stop()
    return output
