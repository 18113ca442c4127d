"""The output folder: written beside the target, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import OutputError
from mergecli.sources import CONFIG_FILES, TOKENIZER_FILES


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output unless force (checked before any tensor is read)."""
    if output.exists() and not force:
        raise OutputError(f"output '{output}' exists; use --force to replace it", path=output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a folder", path=output)


@contextlib.contextmanager
def atomic_folder(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it replaces ``output``.

    On any error the temporary folder is removed and an existing output is left untouched.
    """
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.mergecli-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = output.parent / f".{output.name}.mergecli-old-{os.getpid()}"
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def copy_model_files(
    source: Path, tokenizer_source: Path, folder: Path, out_dtype: torch.dtype
) -> None:
    """config.json (dtype updated), generation config and tokenizer files."""
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    config_file = folder / "config.json"
    if config_file.is_file():
        config: dict[str, Any] = json.loads(config_file.read_text())
        dtype = str(out_dtype).removeprefix("torch.")
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, folder / name)
