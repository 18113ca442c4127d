"""mergecli: stream-merge model checkpoints with bounded memory.

The library API mirrors the CLI::

    import mergecli
    recipe = mergecli.load_recipe("recipe.yaml")
    plan = mergecli.plan_merge(recipe)        # validates everything from headers only
    result = mergecli.run_merge(plan, "merged/")

Names are imported on first use, so that ``import mergecli`` (and ``mergecli --help``) does not
import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mergecli")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

_EXPORTS = {
    "MergeError": "mergecli.errors",
    "MergePlan": "mergecli.engine.plan",
    "MergeResult": "mergecli.engine.merge",
    "Recipe": "mergecli.recipe",
    "get_method": "mergecli.methods",
    "list_methods": "mergecli.methods",
    "load_recipe": "mergecli.recipe",
    "plan_merge": "mergecli.engine.plan",
    "run_merge": "mergecli.engine.merge",
}

if TYPE_CHECKING:
    from mergecli.engine.merge import MergeResult, run_merge
    from mergecli.engine.plan import MergePlan, plan_merge
    from mergecli.errors import MergeError
    from mergecli.methods import get_method, list_methods
    from mergecli.recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergecli' has no attribute {name!r}")


__all__ = [
    "MergeError",
    "MergePlan",
    "MergeResult",
    "Recipe",
    "__version__",
    "get_method",
    "list_methods",
    "load_recipe",
    "plan_merge",
    "run_merge",
]
