"""One registry of merging methods: typed parameter specs and pure tensor functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from mergecli.errors import RecipeError, UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    from mergecli.methods.statistics import Statistic

REQUIRED: Any = object()
"""Default of a parameter the recipe must give."""
SAME: Any = object()
"""``Param.mergekit`` of a parameter whose default is the same under both conventions."""
CONVENTIONS = ("mergecli", "mergekit")
IGNORED_WEIGHT = {"weight": "this method does not weigh the models (mergekit ignores it too)"}
"""The recipe's ``conventions``: mergecli's (the papers') or mergekit 0.1.5's."""

Params = dict[str, Any]
"""Resolved parameters for one tensor: per-model parameters are lists with one value per expert."""


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric parameter lies in; ``open`` ends exclude their value."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        low, high = self.low, self.high
        return (low is None or (value > low if self.low_open else value >= low)) and (
            high is None or (value < high if self.high_open else value <= high)
        )

    def __str__(self) -> str:
        low = "-∞" if self.low is None else f"{self.low:g}"
        high = "∞" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


FRACTION = Bounds(0, 1, low_open=True)
"""(0, 1]: a density or kept fraction (0 would keep nothing: the merge is the base)."""
UNIT = Bounds(0, 1)
"""[0, 1]: an interpolation position."""
DROPPED = Bounds(0, 1, high_open=True)
"""[0, 1): a fraction dropped (1 would drop everything)."""
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)


@dataclass(frozen=True)
class Param:
    """A recipe parameter of a method."""

    name: str
    default: Any
    kind: type = float
    help: str = ""
    per_model: bool = False
    choices: tuple[str, ...] | None = None
    mergekit: Any = SAME
    """The default under ``conventions: mergekit`` when it differs from ``default``."""
    bounds: Bounds | None = None
    """The range of a numeric value, checked before any tensor is read."""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_for(self, conventions: str) -> Any:
        """The default under these conventions."""
        return self.default if conventions != "mergekit" or self.mergekit is SAME else self.mergekit

    def coerce(self, value: Any, key: str) -> Any:
        """Check and convert one resolved scalar value; key names it in the recipe."""
        if self.choices is not None:
            if value not in self.choices:
                raise RecipeError(
                    f"{key}: '{value}' is not one of {', '.join(self.choices)}"
                    + did_you_mean(str(value), self.choices),
                    key=key,
                )
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{key}: expected true or false, got {value!r}", key=key)
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RecipeError(f"{key}: expected a number, got {value!r}", key=key)
            if self.kind is int and float(value) != int(value):
                raise RecipeError(f"{key}: expected a whole number, got {value!r}", key=key)
            self.check_bounds(value, key)
            return self.kind(value)
        if not isinstance(value, self.kind):
            raise RecipeError(f"{key}: expected a {self.kind.__name__}, got {value!r}", key=key)
        return value

    def check_bounds(self, value: float, key: str) -> None:
        """A one-line RecipeError naming ``key`` when a number lies outside ``bounds``."""
        if self.bounds is not None and value not in self.bounds:
            what = f" ({self.help})" if self.help else ""
            raise RecipeError(
                f"{key}: {self.name} must lie in {self.bounds}{what}, got {value!r}", key=key
            )


@dataclass(frozen=True)
class MethodSpec:
    """A merging method: its function, parameters and requirements.

    Every field describes the method itself: ``output`` is the type ``fn`` returns, and
    ``elementwise`` and ``coefficients`` are facts about its arithmetic that the engine (row
    pieces) and the LoRA output (exact pairs) rely on. ``selects_experts`` marks a method whose
    definition includes choosing experts by evaluation (the evaluation layer runs it).
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "unused"] = "required"
    """Whether the method needs a base model; "unused": a base only supplies layout and config."""
    min_models: int = 1
    max_models: int | None = None
    convention: str = ""
    statistics: Callable[[dict[str, Params], Callable[[str], None]], list[Statistic]] | None = None
    """Builds the whole-model statistics the method needs from every merged tensor's params
    (it may adjust those params, and report why through the warning callback)."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Parameters accepted for compatibility and ignored, with the reason shown to the user."""
    check: Callable[[Params, str], None] | None = None
    """Raises RecipeError when one tensor's resolved parameters are invalid (called while
    planning, with the tensor's name)."""
    output: Literal["model", "task_masks"] = "model"
    """What ``fn`` returns per tensor: merged weights ("model"), or a ``TaskMasks`` that the
    engine writes into a task-conditional artifact ("task_masks")."""
    elementwise: bool | Callable[[Params], bool] = False
    """Whether each merged entry depends only on the same entry of the inputs (and whole-model
    statistics), given a tensor's params: the engine may then merge that tensor in row chunks,
    with results equal to the whole tensor's bit for bit."""
    stored_inputs: bool | Callable[[Params], bool] = False
    """Whether, given a tensor's params, the method takes float32-compute inputs stored as
    bfloat16 as they are (``TensorInputs.as_stored``): its compiled loop widens them, and every
    torch path first calls ``inputs.widen()``."""
    selects_experts: bool = False
    """The method chooses which listed experts to merge by scoring candidate merges
    (greedy_soup): ``plan_merge`` refuses it, ``mergecli.evaluate.plan_with_selection`` and
    ``score_recipe`` run that selection with the recipe's ``evaluate:`` section first; ``fn``
    then merges the experts selected."""
    coefficients: Callable[[Params], list[float] | None] | None = None
    """For a method whose merged task vector is Σ ct τt (a linear combination): the ct of one
    tensor's parameters, or None when these parameters make it no such combination. Lets LoRA
    experts merge into an exact LoRA output by concatenating their ranks."""
    mergekit: str = ""
    """What ``conventions: mergekit`` changes beyond parameter defaults (mergekit 0.1.5's
    behaviour that the method then reproduces); the method reads ``p["conventions"]``."""
    mergekit_models: tuple[int, int | None] | None = None
    """(min, max) experts under ``conventions: mergekit`` where they differ (mergekit's base is
    an endpoint of slerp, nearswap and arcee_fusion)."""
    mergekit_compute: Literal["dtype", "float32"] = "float32"
    """The precision mergekit 0.1.5 computes the method in, which ``conventions: mergekit``
    follows: "dtype" (the recipe's ``dtype``, which mergekit casts every tensor to on loading)
    or "float32" (float64 when ``dtype`` is float64: mergekit upcasts, as mergecli always does)."""
    composes: str | None = None
    """The parameter naming another method that this one wraps (``lines``' base_method): the
    recipe then also takes that method's parameters, and its statistics and checks apply."""

    def is_elementwise(self, params: Params) -> bool:
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

    def takes_stored(self, params: Params) -> bool:
        return self.stored_inputs(params) if callable(self.stored_inputs) else self.stored_inputs

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, parameters: dict[str, Any]) -> MethodSpec:
        """The method as a recipe with these global ``parameters`` runs it.

        A composite method gains the parameters, statistics, checks and ignored keys of the
        method it wraps; any other method is returned unchanged.
        """
        if self.composes is None:
            return self
        own = self.param(self.composes)
        assert own is not None and self.statistics is None and self.check is None
        key = f"parameters.{self.composes}"
        name = parameters.get(self.composes, own.default)
        if not isinstance(name, str):
            raise RecipeError(
                f"{key}: expected one method name for the whole merge, got {name!r}", key=key
            )
        inner = get_method(name, key)
        if inner.composes or inner.output != "model" or inner.base == "unused":
            raise RecipeError(
                f"{key}: '{name}' cannot be wrapped by '{self.name}', which needs a method that "
                "merges task vectors into one model (task_arithmetic, ties, dare_ties, ...)",
                key=key,
            )
        clash = next((p.name for p in inner.params if self.param(p.name)), None)
        if clash:
            raise RecipeError(
                f"{key}: '{name}' has a parameter '{clash}' of its own, which '{self.name}' "
                "also takes; choose another base method",
                key=key,
            )
        return replace(
            self,
            params=self.params + inner.params,
            statistics=inner.statistics,
            check=inner.check,
            ignored={**inner.ignored, **self.ignored},
            base="required",
        )

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]


_REGISTRY: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    summary: str,
    params: tuple[Param, ...] = (),
    **options: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(inputs, params)`` as a merging method; it returns the merged tensor (or
    ``TaskMasks``), or a ``Merged`` with the fractions it kept."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merging method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, summary=summary, params=params, **options)
        return fn

    return register


def get_method(name: str | None, key: str = "merge_method") -> MethodSpec:
    """The registered method called ``name``; UnknownMethodError (naming the recipe ``key``) with a
    suggestion otherwise."""
    if name is None:  # an MoE recipe may leave it out; every merge needs it
        raise RecipeError(
            f"missing required key '{key}' (an MoE recipe runs with 'mergecli moe')", key=key
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"{key}: unknown method '{name}'{did_you_mean(name, _REGISTRY)}; "
            "'mergecli methods' lists them",
            method=name,
            key=key,
        ) from None


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())
