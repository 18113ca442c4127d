"""The testbed's data: scikit-learn's handwritten digits, seen through one transform per task.

Each 8×8 image (pixel intensities 0–16) becomes a "sentence" of 16 patch tokens, row by row: a
token spells the 2×2 patch's four pixels on a 4-level scale (``"0312"``), so 256 words in all.
Every task shares the same images and the same 10 labels; what differs is how the image is
presented (rotated, mirrored, inverted, …), as in the vision benchmarks of the merging papers.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDE = 8
LEVELS = 17  # pixel intensities 0..16
PATCH = 2
SHADES = 3  # quantised levels in a patch token
PATCHES = (SIDE // PATCH) ** 2

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotate90": lambda img: np.rot90(img, 1),
    "mirror": lambda img: img[:, ::-1],
    "invert": lambda img: LEVELS - 1 - img,
    "rotate180": lambda img: np.rot90(img, 2),
    "transpose": lambda img: img.T,
    "flip": lambda img: img[::-1, :],
    "rotate270": lambda img: np.rot90(img, 3),
    "shift": lambda img: np.roll(img, (2, 2), axis=(0, 1)),
}
"""Task name -> transform of one (8, 8) image; the reduced testbed uses the first six."""


def digits_path() -> Path:
    """scikit-learn's bundled copy of the UCI optical digits (found without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the testbed needs scikit-learn's digits data: pip install 'mergecli[testbed]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as int64 (n, 8, 8) and labels (n,)."""
    with gzip.open(digits_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, SIDE, SIDE), table[:, -1]


@dataclass(frozen=True)
class Split:
    """Indices into the digits of the train / validation / test parts (shared by all tasks)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_indices(n: int, seed: int, held_out: int | None = None) -> Split:
    """A seeded 60/20/20 split; ``held_out`` caps the validation and test parts."""
    order = np.random.default_rng(seed).permutation(n)
    part = n // 5
    keep = part if held_out is None else min(part, held_out)
    return Split(
        train=order[2 * part :], validation=order[:part][:keep], test=order[part : 2 * part][:keep]
    )


def to_text(image: np.ndarray) -> str:
    """Row-major 2×2 patch tokens separated by spaces."""
    shades = image * SHADES // LEVELS
    grid = shades.reshape(SIDE // PATCH, PATCH, SIDE // PATCH, PATCH).transpose(0, 2, 1, 3)
    return " ".join("".join(map(str, patch.reshape(-1))) for patch in grid.reshape(PATCHES, -1))


def examples(
    images: np.ndarray, labels: np.ndarray, task: str | None
) -> list[dict[str, str | int]]:
    """{"text", "label"} records; ``task=None`` keeps the images upright (pretraining)."""
    transform = TRANSFORMS[task] if task else (lambda img: img)
    return [
        {"text": to_text(transform(img)), "label": int(label)}
        for img, label in zip(images, labels, strict=True)
    ]


def write_jsonl(path: Path, records: list[dict[str, str | int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, str | int]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
