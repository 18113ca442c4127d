"""The I/O floor of a merge: read every input tensor, write an output of the same layout.

``python -m scripts.io_floor OUT INPUT [INPUT ...]`` reads each tensor of every input folder
with safetensors into private memory (no arithmetic) and writes the first input's tensors into
OUT with the first input's shard layout and index. No merge can do less work than this.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


def shard_names(folder: Path) -> dict[str, list[str]]:
    """Each shard file of a folder with the tensor names it holds, in index order."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(file, []).append(name)
    return shards


def copy_floor(out: Path, inputs: list[Path]) -> int:
    """Read everything, write the first input's layout; returns the bytes read."""
    out.mkdir(parents=True)
    read = 0
    for file, names in shard_names(inputs[0]).items():
        handles = [safe_open(str(folder / file), framework="pt") for folder in inputs]
        state = {}
        for name in names:
            copies = [handle.get_tensor(name).clone() for handle in handles]
            read += sum(c.nbytes for c in copies)
            state[name] = copies[0]
        save_file(state, out / file, metadata={"format": "pt"})
    shutil.copyfile(inputs[0] / INDEX, out / INDEX)
    shutil.copyfile(inputs[0] / "config.json", out / "config.json")
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
    args = parser.parse_args()
    print(copy_floor(args.out, args.inputs))


if __name__ == "__main__":
    main()
