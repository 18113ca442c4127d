"""Merging methods: pure tensor functions behind one registry.

Importing this package registers every method module below.
"""

from mergecli.methods import linear, ties  # noqa: F401  (registration)
from mergecli.methods.inputs import TensorInputs
from mergecli.methods.registry import REQUIRED, MethodSpec, Param, Params, get_method, list_methods

__all__ = [
    "REQUIRED",
    "MethodSpec",
    "Param",
    "Params",
    "TensorInputs",
    "get_method",
    "list_methods",
]
