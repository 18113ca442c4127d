"""Analyses of experts before merging: parameter interference, over training, and inspection."""

from mergecli.analyze.interference import analyze_interference
from mergecli.analyze.sweep import analyze_over_checkpoints

__all__ = ["analyze_interference", "analyze_over_checkpoints"]
