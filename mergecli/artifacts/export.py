"""Write one task of an artifact as a standard Hugging Face checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from mergecli.artifacts import Artifact, check_task
from mergecli.engine.layout import parse_size, plan_shards
from mergecli.engine.output import atomic_folder, copy_model_files
from mergecli.engine.writer import ShardWriter
from mergecli.progress import NullProgress, Progress


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
    progress = progress or NullProgress()
    output = Path(output).resolve()
    names = artifact.tensor_names()
    specs = [(n, *artifact.tensor_spec(n)) for n in names]
    shards = plan_shards(specs, parse_size(shard_size))
    dtypes = [d for _, _, d in specs if d.is_floating_point]
    needed = sum(s.nbytes for s in shards)
    with atomic_folder(output, force, wait, needed) as folder:
        writer = ShardWriter(folder, shards, {"mergecli_task": task})
        progress.start(f"exporting {task}", len(names), sum(s.nbytes for s in shards))
        for name, _shape, dtype in specs:
            tensor = artifact.task_tensor(task, name).to(dtype)
            writer.write(name, tensor)
            progress.advance(1, tensor.nbytes)
        writer.finish()
        copy_model_files(
            artifact.model_files(),
            artifact.model_files(),
            folder,
            max(set(dtypes), key=dtypes.count),
        )
    progress.stop()
    return output
