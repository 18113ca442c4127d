"""Models on the Hugging Face Hub: ``org/name`` or ``org/name@revision``, fetched into the
shared Hugging Face cache (only weights, configs, tokenizer and adapter files).

``huggingface_hub`` honours ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``
(offline, or when the Hub cannot be reached, a cached snapshot is used).
"""

from __future__ import annotations

import re
from pathlib import Path

from mergecli.errors import MergeError
from mergecli.sources.checkpoint import CONFIG_FILES, TOKENIZER_FILES

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
FILES = (
    "*.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    *CONFIG_FILES,
    *TOKENIZER_FILES,
)
"""What a merge needs from a repository (no pickle weights, no remote code)."""


def parse_hub_id(value: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``value`` reads as a Hub id; the ``@revision`` suffix and a
    ``revision`` key must not disagree."""
    match = HUB_ID.match(value)
    if not match:
        return None
    rev = match["rev"]
    if rev and revision and rev != revision:
        raise MergeError(f"'{value}' names revision {rev} but its revision key says {revision}")
    return match["repo"], rev or revision


def hub_snapshot(repo: str, revision: str | None, label: str) -> Path:
    """The local snapshot folder of a Hub model, downloading missing files (with progress)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(FILES)))
    except GatedRepoError:
        reason = "is gated: accept its terms on the Hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        reason = "is not on the Hub (or is private: set HF_TOKEN)"
    except RevisionNotFoundError:
        reason = f"has no revision '{revision}'"
    except LocalEntryNotFoundError:
        reason = (
            "is not in the Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network)"
        )
    except (HfHubHTTPError, OSError) as exc:
        reason = f"could not be fetched: {str(exc).splitlines()[0]}"
    raise MergeError(f"{label}: '{at}' is not a local folder and {reason}")
