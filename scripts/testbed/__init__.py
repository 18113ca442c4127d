"""A small real merging benchmark, built offline on a CPU (``python -m scripts.testbed``)."""

from scripts.testbed.build import build

__all__ = ["build"]
