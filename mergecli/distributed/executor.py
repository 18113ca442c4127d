"""Where independent work runs: in this process, or as tasks on a Ray cluster.

An executor takes tasks (a function and its arguments; arguments may be the handles of earlier
tasks, which then run first and pass their results) and hands back every result, or the error
that ended its task, with where it ran. The local executor runs each task when it is submitted;
the Ray executor submits ``ray.remote`` tasks with resource requests and retries for workers
that die, and cancels what is left on Ctrl-C. Results are gathered in submission order, so
tables built from them are the same whichever executor ran them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import mergecli
from mergecli.errors import MergeError

ExecutorName = Literal["local", "ray"]
EXECUTORS: tuple[ExecutorName, ...] = get_args(ExecutorName)
RETRIES = 3
"""Times a Ray task is retried when its worker process or node dies."""


@dataclass(frozen=True)
class Resources:
    """What one task asks a Ray node for (ignored locally): CPUs, GPUs and bytes of memory."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: int | None = None

    @classmethod
    def for_device(cls, device: str, memory: int | None = None) -> Resources:
        """One GPU for a task on ``cuda``/``cuda:N``/``auto`` where this machine has one, else
        none (Ray then makes the task's ``cuda`` its own GPU)."""
        import torch

        gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return cls(num_gpus=1 if gpu else 0, memory=memory)

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = self.memory
        return out


@dataclass
class Done:
    """A finished task: its value, or the exception that ended it; where it ran."""

    index: int
    value: Any = None
    error: BaseException | None = None
    where: dict[str, Any] = field(default_factory=dict)


def here() -> dict[str, Any]:
    """The node and process running the caller (for reports of which node did what)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class LocalExecutor:
    """Runs tasks in this process, one after the other, each when its result is asked for
    (a consumer that stops early leaves the rest unrun)."""

    kind: Literal["local", "ray"] = "local"

    def __init__(self) -> None:
        self._tasks: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(
        self, fn: Callable[..., Any], *args: Any, resources: Resources | None = None
    ) -> Handle:
        self._tasks.append((fn, args))
        return Handle(len(self._tasks) - 1)

    def results(self) -> Iterator[Done]:
        """Every submitted task's outcome, in submission order."""
        tasks, self._tasks = self._tasks, []
        done: list[Done] = []
        for index, (fn, args) in enumerate(tasks):
            values = [done[a.index].value if isinstance(a, Handle) else a for a in args]
            try:
                done.append(Done(index, fn(*values), where=here()))
            except Exception as exc:
                done.append(Done(index, error=exc, where=here()))
            yield done[-1]


@dataclass(frozen=True)
class Handle:
    """A submitted local task; passing it as an argument passes its result."""

    index: int


def _traced(
    fn: Callable[..., Any], deps: tuple[int, ...], *args: Any
) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` on a Ray worker and say where; the arguments at positions ``deps`` are earlier
    tasks' (value, where) pairs, of which ``fn`` gets the value."""
    import ray

    values = [a[0] if i in deps else a for i, a in enumerate(args)]
    where = {**here(), "node_id": ray.get_runtime_context().get_node_id()}
    return fn(*values), where


class RayExecutor:
    """Submits tasks to a Ray cluster (``address``: a running cluster, ``auto``, or None for a
    local one on this machine with ``num_cpus`` CPUs, stopped when this process exits); joins
    the cluster this process is already connected to, if any."""

    kind: Literal["local", "ray"] = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MergeError("--executor ray needs Ray: pip install 'mergecli[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            # workers import the same mergecli as this driver (a source checkout included)
            source = Path(mergecli.__file__).parents[1]
            checkout = None if source.name in ("site-packages", "dist-packages") else str(source)
            path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
            try:
                ray.init(
                    address=address,
                    num_cpus=num_cpus if address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"PYTHONPATH": path}} if path else None,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MergeError(f"--address {address}: cannot start or join Ray: {exc}") from None
        self._remote = ray.remote(_traced)
        self._refs: list[Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources | None = None) -> Any:
        """A Ray task; a handle (ObjectRef) among ``args`` passes that task's value."""
        options = (resources or Resources()).options()
        deps = tuple(i for i, a in enumerate(args) if isinstance(a, self.ray.ObjectRef))
        ref = self._remote.options(max_retries=RETRIES, **options).remote(fn, deps, *args)
        self._refs.append(ref)
        return ref

    def results(self) -> Iterator[Done]:
        """Outcomes in submission order (each waits for its task); Ctrl-C cancels the rest."""
        refs, self._refs = self._refs, []
        try:
            for index, ref in enumerate(refs):
                try:
                    value, where = self.ray.get(ref)
                    yield Done(index, value, where=where)
                except self.ray.exceptions.RayError as exc:
                    yield Done(index, error=_cause(exc))
        except BaseException:
            for ref in refs:
                self.ray.cancel(ref, force=True)
            raise


def _cause(exc: BaseException) -> BaseException:
    """The user's error inside a Ray task error (a MergeError keeps its type)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def executor_for(name: str, address: str | None = None) -> LocalExecutor | RayExecutor:
    """``--executor local|ray`` with ``--address`` (which only Ray takes)."""
    if name not in EXECUTORS:
        raise MergeError(f"--executor: expected one of {', '.join(EXECUTORS)}, got '{name}'")
    if name == "local":
        if address is not None:
            raise MergeError("--address: only used with --executor ray")
        return LocalExecutor()
    return RayExecutor(address)
