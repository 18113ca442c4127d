"""Merging methods: pure tensor functions behind one registry.

Importing this package registers every method module below.
"""

# Registration order is the order in which `mergecli methods` lists them.
# isort: off
from mergecli.methods import (  # noqa: F401  (registration)
    linear,
    ties,
    breadcrumbs,
    della,
    magmax,
    slerp,
    model_stock,
    lines,
    pcb,
    tsv,
    consensus,
    emr,
    spherical,
    sce,
    arcee_fusion,
    nearswap,
    ram,
    passthrough,
)

# isort: on
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import REQUIRED, MethodSpec, Param, Params, get_method, list_methods
from mergecli.methods.task_masks import TaskMasks

__all__ = [
    "REQUIRED",
    "MethodSpec",
    "Param",
    "Params",
    "TaskMasks",
    "TensorInputs",
    "get_method",
    "list_methods",
]
