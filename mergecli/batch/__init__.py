"""Batches of recipes: several named merges in one file, run in dependency order, resumable."""

from mergecli.batch.display import BatchDisplay
from mergecli.batch.graph import Batch, BatchRecipe, load_batch
from mergecli.batch.run import BatchResult, Outcome, RunOptions, run_batch, run_recipe

__all__ = [
    "Batch",
    "BatchDisplay",
    "BatchRecipe",
    "BatchResult",
    "Outcome",
    "RunOptions",
    "load_batch",
    "run_batch",
    "run_recipe",
]
