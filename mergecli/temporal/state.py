"""A temporal state folder: its current models, links, lock, cleanup, sources and status.

Layout::

    STATE/
      temporal.json         the manifest (settings, experts, current models)
      steps/0003/ema/       EMA after step 3 (an HF folder), when init or deploy is ema
      steps/0003/all/       deploy-all merge of step 3, when deploy is all
      deploy -> steps/0003/ema       the model to serve now
      init -> steps/0003/ema         the model to train the next expert from

``deploy`` and ``init`` are symbolic links (relative inside the state, absolute to the base or
an expert), so a model that is both, or that is an input, is never copied.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergecli.engine.output import atomic_folder
from mergecli.errors import MergeError, OutputError, SourceError
from mergecli.sources import Checkpoint
from mergecli.temporal.manifest import MANIFEST, Manifest, read_manifest, write_manifest

STEPS = "steps"
LOCK = ".lock"
LINKS = ("init", "deploy")


def resolve(folder: Path, ref: str) -> Path:
    """A manifest reference as a path: state-relative inside the state, else absolute."""
    path = Path(ref)
    return path if path.is_absolute() else folder / path


def init_model(manifest: Manifest) -> str:
    """Reference of the model the next expert trains from: base θ0, latest θt or EMA_t."""
    strategy = manifest.temporal.init
    if strategy == "ema" and manifest.ema:
        return manifest.ema
    if strategy == "latest" and manifest.steps:
        return manifest.steps[-1].expert
    return str(manifest.base)


def deploy_model(manifest: Manifest) -> str:
    """Reference of the model to serve: the base before any expert, else latest, EMA or all."""
    if not manifest.steps:
        return str(manifest.base)
    strategy = manifest.temporal.deploy
    if strategy == "latest":
        return manifest.steps[-1].expert
    ref = manifest.ema if strategy == "ema" else manifest.merged
    if ref is None:
        raise SourceError(
            f"{MANIFEST}: deploy: {strategy} but no {strategy} model is recorded", path=MANIFEST
        )
    return ref


def needed_experts(manifest: Manifest) -> set[int]:
    """Indices of the experts a later step or a link still reads."""
    temporal, count = manifest.temporal, len(manifest.steps)
    if temporal.deploy == "all":
        return set(range(count))
    if count and "latest" in (temporal.init, temporal.deploy):
        return {count - 1}
    return set()


def source_state(path: Path, fingerprint: str, allow_bin: bool = False) -> str:
    """``ok``, ``missing`` or ``changed``: whether a referenced checkpoint is still as recorded."""
    if not path.is_dir():
        return "missing"
    try:
        found = Checkpoint(path, str(path), allow_bin=allow_bin).fingerprint()
    except MergeError:
        return "changed"
    return "ok" if found == fingerprint else "changed"


def check_source(path: Path, fingerprint: str, label: str, allow_bin: bool = False) -> None:
    """MergeError when a checkpoint the state relies on moved or changed since it was recorded."""
    state = source_state(path, fingerprint, allow_bin)
    if state == "missing":
        raise SourceError(
            f"{label} '{path}' no longer exists; the state needs it: restore it", path=path
        )
    if state == "changed":
        raise SourceError(
            f"{label} '{path}' changed since it was added (fingerprint {fingerprint}); "
            "the state needs it as it was: restore it",
            path=path,
        )


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the state's lock (one writer at a time); released when the process ends anyway."""
    fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"state '{folder}' is being updated by another process", path=folder
            ) from None
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def collect_garbage(folder: Path, manifest: Manifest) -> None:
    """Delete what the manifest does not reference: an interrupted step, superseded models."""
    refs = [manifest.ema, manifest.merged, *(s.deploy for s in manifest.steps)]
    keep = {Path(r) for r in refs if r and not Path(r).is_absolute()}
    for leftover in folder.glob(f".{MANIFEST}.tmp-*"):
        leftover.unlink()
    root = folder / STEPS
    if not root.is_dir():
        return
    for step in root.iterdir():
        if not step.is_dir() or step.is_symlink():
            _remove(step)
            continue
        for child in step.iterdir():
            if child.relative_to(folder) not in keep:
                _remove(child)
        if not any(step.iterdir()):
            step.rmdir()


def update_links(folder: Path, manifest: Manifest) -> None:
    """Point ``init`` and ``deploy`` at the manifest's current models (each swap is atomic)."""
    for name, ref in (("init", init_model(manifest)), ("deploy", deploy_model(manifest))):
        link = folder / name
        if link.exists() and not link.is_symlink():
            raise OutputError(f"'{link}' is not a link that mergecli made; move it away", path=link)
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(ref, tmp)
        os.replace(tmp, link)


def settle(folder: Path, manifest: Manifest) -> None:
    """After a commit (or on a rerun that finds the step committed): links, then cleanup."""
    update_links(folder, manifest)
    collect_garbage(folder, manifest)


def create_state(folder: Path, manifest: Manifest, force: bool) -> None:
    """Write a new state folder atomically; --force replaces only a state or an empty folder."""
    if folder.exists():
        if not force:
            raise OutputError(f"state '{folder}' exists; use --force to start it over", path=folder)
        if not folder.is_dir() or (any(folder.iterdir()) and not (folder / MANIFEST).is_file()):
            raise OutputError(
                f"'{folder}' exists and is not a temporal state; not replacing it", path=folder
            )
        with locked(folder), atomic_folder(folder, force=True) as tmp:
            write_manifest(tmp, manifest)
            update_links(tmp, manifest)
        return
    with atomic_folder(folder, force=False) as tmp:
        write_manifest(tmp, manifest)
        update_links(tmp, manifest)


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``; links are not followed."""
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(
            (Path(root) / f).lstat().st_size for f in files if not (Path(root) / f).is_symlink()
        )
    return total


def status(state: str | Path) -> dict[str, Any]:
    """The sequence, the strategies, the current models and the sizes on disk of a state."""
    folder = Path(state).resolve()
    manifest = read_manifest(folder)
    temporal, settings = manifest.temporal, manifest.settings
    allow_bin = bool(settings.get("allow_bin"))
    needed = needed_experts(manifest)
    experts = [
        {
            "step": i + 1,
            "name": s.name,
            "path": s.expert,
            "fingerprint": s.fingerprint,
            "source": source_state(Path(s.expert), s.fingerprint, allow_bin),
            "needed": i in needed,
            "deploy": str(resolve(folder, s.deploy)) if s.deploy else None,
        }
        for i, s in enumerate(manifest.steps)
    ]
    own = {
        key: tree_bytes(resolve(folder, ref)) if ref else 0
        for key, ref in (("ema", manifest.ema), ("merged", manifest.merged))
    }
    kept = {s.deploy for s in manifest.steps[:-1] if s.deploy} - {manifest.ema, manifest.merged}
    referenced = [manifest.base] + [Path(manifest.steps[i].expert) for i in sorted(needed)]
    return {
        "state": str(folder),
        "steps": len(manifest.steps),
        "method": settings["merge_method"],
        "parameters": settings["parameters"],
        "init": temporal.init,
        "deploy": temporal.deploy,
        "ema_weight": temporal.ema_weight,
        "keep_steps": temporal.keep_steps,
        "base": {
            "path": str(manifest.base),
            "fingerprint": manifest.base_fingerprint,
            "source": source_state(manifest.base, manifest.base_fingerprint, allow_bin),
        },
        "init_model": str(resolve(folder, init_model(manifest))),
        "deploy_model": str(resolve(folder, deploy_model(manifest))),
        "experts": experts,
        "disk": {
            "state_bytes": tree_bytes(folder),
            "ema_bytes": own["ema"],
            "merged_bytes": own["merged"],
            "kept_steps_bytes": sum(
                tree_bytes(resolve(folder, r)) for r in kept if not Path(r).is_absolute()
            ),
            "referenced_bytes": sum(tree_bytes(p) for p in referenced),
        },
    }
