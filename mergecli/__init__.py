"""mergecli: stream-merge model checkpoints with bounded memory.

The library API mirrors the CLI::

    import mergecli
    recipe = mergecli.load_recipe("recipe.yaml")
    plan = mergecli.plan_merge(recipe)        # validates everything from headers only
    result = mergecli.run_merge(plan, "merged/")
"""

from importlib.metadata import PackageNotFoundError, version

from mergecli.engine.merge import MergeResult, run_merge
from mergecli.engine.plan import MergePlan, plan_merge
from mergecli.errors import MergeError
from mergecli.methods import get_method, list_methods
from mergecli.recipe import Recipe, load_recipe

try:
    __version__ = version("mergecli")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

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
