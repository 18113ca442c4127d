"""Models on the Hugging Face Hub: ``org/name`` or ``org/name@revision``, fetched into the
shared Hugging Face cache (only weights, configs, tokenizer and adapter files).

``huggingface_hub`` honours ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``
(offline, or when the Hub cannot be reached, the cached snapshot is used). The small files come
first; weight shards that are not cached are downloaded, once the merge starts reading, one
after the other on a background thread while the merge reads the shards that have arrived
(their headers come from the Hub's safetensors metadata, so the merge is planned before any
shard arrives).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mergecli.errors import HubError, RecipeError
from mergecli.sources.checkpoint import (
    CONFIG_FILES,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
SMALL_FILES = (
    INDEX_NAME,
    "adapter_config.json",
    "adapter_model.safetensors",
    *CONFIG_FILES,
    *TOKENIZER_FILES,
)
"""Fetched before planning; weights (``*.safetensors``) follow. No pickle, no remote code."""


def parse_hub_id(value: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``value`` reads as a Hub id; the ``@revision`` suffix and a
    ``revision`` key must not disagree."""
    match = HUB_ID.match(value)
    if not match:
        return None
    rev = match["rev"]
    if rev and revision and rev != revision:
        raise RecipeError(
            f"'{value}' names revision {rev} but its revision key says {revision}", key="revision"
        )
    return match["repo"], rev or revision


def hub_error(exc: Exception, revision: str | None) -> str:
    """Why a Hub model could not be had, in words (huggingface_hub's error types)."""
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "is gated: accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return "is not on the Hub (or is private: set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"has no revision '{revision}'"
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return (
            "is not in the Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network)"
        )
    if isinstance(exc, NotASafetensorsRepoError):
        return "has no safetensors weights"
    return f"could not be fetched: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def hub_snapshot(repo: str, revision: str | None, label: str) -> Path:
    """The snapshot folder of a Hub model in the cache, with its small files (configs,
    tokenizer, index, adapter); weight shards may still be missing."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(SMALL_FILES)))
    except Exception as exc:  # HTTP, cache and connection errors of huggingface_hub and httpx
        at = f"{repo}@{revision}" if revision else repo
        reason = hub_error(exc, revision)
        raise HubError(
            f"{label}: '{at}' is not a local folder and {reason}", repo_id=repo
        ) from None


def snapshot_repo(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder laid out as ``models--org--name/snapshots/<commit>``."""
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return None
    return folder.parent.parent.name.removeprefix("models--").replace("--", "/"), folder.name


def weights_missing(folder: Path) -> bool:
    """Whether a snapshot lacks weight shards (those its index names, or any safetensors)."""
    index = folder / INDEX_NAME
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        return not all((folder / f).is_file() for f in files)
    return not any(folder.glob("*.safetensors"))


class DownloadingCheckpoint(Checkpoint):
    """A Hub checkpoint whose shards download in the background while it is read.

    Headers come from the Hub's safetensors metadata; the first ``read`` starts the downloads,
    and each ``read`` waits only for the shard that holds its tensor.
    """

    def __init__(self, folder: Path, label: str, repo: str, commit: str) -> None:
        from huggingface_hub import get_safetensors_metadata

        self.path = folder
        self.label = label
        self.repo = repo
        self._bins: dict[Path, dict[str, Any]] = {}
        self._infos: dict[str, TensorInfo] = {}
        try:
            metadata = get_safetensors_metadata(repo, revision=commit)
        except Exception as exc:  # as in hub_snapshot
            raise HubError(
                f"{label}: '{repo}' (weights) {hub_error(exc, commit)}", repo_id=repo, path=folder
            ) from None
        for file, header in sorted(metadata.files_metadata.items()):
            for name, tensor in header.tensors.items():
                if tensor.dtype not in SAFETENSORS_DTYPES:
                    raise HubError(
                        f"{label}: tensor '{name}' in {repo}/{file} is {tensor.dtype}",
                        repo_id=repo,
                        path=folder / file,
                    )
                dtype = SAFETENSORS_DTYPES[tensor.dtype]
                self._infos[name] = TensorInfo(tuple(tensor.shape), dtype, folder / file)
        self.files = sorted({info.file for info in self._infos.values()})
        self._commit = commit
        self._downloads: dict[Path, Future[str]] = {}
        self._lock = threading.Lock()

    def _download(self) -> None:
        """Queue every shard's download, in order, on one background thread (once)."""
        from huggingface_hub import hf_hub_download

        with self._lock:
            if self._downloads:
                return
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-download")
            for file in self.files:
                self._downloads[file] = pool.submit(
                    hf_hub_download, self.repo, file.name, revision=self._commit
                )
            pool.shutdown(wait=False)

    def _local(self, file: Path) -> Path:
        """The shard once downloaded; the first call starts the downloads (so planning and
        ``--dry-run`` fetch no weights)."""
        self._download()
        try:
            return Path(self._downloads[file].result())
        except Exception as exc:  # as in hub_snapshot
            raise HubError(
                f"{self.label}: downloading {self.repo}/{file.name} failed: {exc}",
                repo_id=self.repo,
                path=file,
            ) from None

    def _fetch_all(self) -> None:
        for file in self.files:
            self._local(file)

    @property
    def nbytes(self) -> int:
        self._fetch_all()
        return super().nbytes

    def fingerprint(self) -> str:
        self._fetch_all()
        return super().fingerprint()


def open_checkpoint(folder: Path, label: str, allow_bin: bool = False) -> Checkpoint:
    """A checkpoint folder; a Hub snapshot whose shards are not all cached downloads them while
    it is read."""
    repo = snapshot_repo(folder)
    if repo is None or not weights_missing(folder):
        return Checkpoint(folder, label, allow_bin=allow_bin)
    return DownloadingCheckpoint(folder, label, *repo)
