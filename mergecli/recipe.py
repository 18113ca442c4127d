"""The YAML recipe: a superset of mergekit's basic schema, validated before any tensor is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from mergecli.chat_template import check_chat_template
from mergecli.errors import RecipeError, SourceError, did_you_mean
from mergecli.params import check_value

DTYPES = ("float32", "float64", "bfloat16", "float16")
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "half": "float16",
    "float": "float32",
    "double": "float64",
}


Conventions = Literal["mergecli", "mergekit"]
"""Whose defaults and behaviour a recipe follows: the papers' (mergecli) or mergekit 0.1.5's."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(_Strict):
    """One expert: a checkpoint or adapter folder or Hub id, its name and per-model parameters."""

    model: str
    name: str | None = None
    revision: str | None = None
    """The Hub revision (branch, tag or commit) when ``model`` is a Hub id."""
    parameters: dict[str, Any] = Field(default_factory=dict)


class TemporalSection(_Strict):
    """The ``temporal:`` section of a recipe: experts arrive one at a time, in ``models`` order.

    ``init`` picks the model the next expert trains from, ``deploy`` the model served after each
    step; ``ema_weight`` is w in EMA_t = f(θ0, [EMA_{t−1}, θt], weights [1 − w, w]), EMA_0 = θ0
    (see ``mergecli.temporal``).
    """

    init: Literal["base", "latest", "ema"] = "ema"
    deploy: Literal["latest", "ema", "all"] = "ema"
    ema_weight: float = Field(0.5, gt=0, le=1)
    keep_steps: bool = False
    recency: Literal["uniform", "log", "quadratic", "exponential", "cubic"] = "uniform"
    """Weights of ``deploy: all`` over the experts so far (``mergecli.temporal.recency``)."""
    recency_reversed: bool = False
    """Give the larger recency weights to the older experts instead (TIME App. D.2)."""
    task_vectors: Literal["base", "previous"] = "base"
    """Task vectors of the EMA merge against θ0, or against EMA_{t−1} (TIME App. B)."""
    train: str | None = None
    """Command that trains step t's expert from the init model (``temporal evaluate`` only):
    a template with {init}, {output}, {task}, {step} and {model}."""


class EvalTask(_Strict):
    """One task of an ``evaluate:`` section: its validation and test data files and the expert
    trained for it."""

    data: str | None = None
    test_data: str | None = None
    expert: str | None = None


class EvaluateSection(_Strict):
    """How a candidate model is scored (see ``mergecli.evaluate``).

    Exactly one of ``metric`` (built-in: loss, perplexity or accuracy on local files) and
    ``command`` (a template with {model}, {task} and {data} that prints a number or a JSON
    object with a ``score``). ``data`` may contain ``{task}``; ``tasks`` maps task names to
    their data and expert (the model of that name by default). ``data`` is what selection
    (sweeps, greedy soup, T*) scores on: the validation data; ``test_data`` (same forms), when
    given, is what the selected merge is reported on.
    """

    metric: Literal["loss", "perplexity", "accuracy"] | None = None
    command: str | None = None
    data: str | None = None
    test_data: str | None = None
    tasks: dict[str, EvalTask] | list[str] | None = None
    higher_is_better: bool | None = None
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)


class FlexSection(_Strict):
    """The ``flex:`` section of a recipe: FlexMerge's options (see ``mergecli.flex``).

    ``granularity`` is component, layer, tensor or a list of regular expressions (a tensor's
    block is the text the first matching pattern matches); ``sizes`` are the target sizes in
    units of one model (of one adapter's modules with PEFT experts); ``heads`` name the
    task-specific heads.
    """

    granularity: Literal["component", "layer", "tensor"] | list[str] = "component"
    linkage: Literal["min", "max", "avg", "merged", "random"] = "min"
    order: Literal["greedy", "left_to_right", "right_to_left"] = "greedy"
    strategy: Literal["flexmerge", "channel"] = "flexmerge"
    sizes: list[float] | None = Field(None, min_length=1)
    heads: list[str] = Field(default_factory=list)
    """Regular expressions naming task-specific heads: kept per task, not merged, not sized."""


class MoePrompts(_Strict):
    """An expert's routing prompts for the ``hidden`` and ``cheap_embed`` gates (mergekit-moe's
    ``positive_prompts`` / ``negative_prompts``)."""

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)


class MoeSection(_Strict):
    """The ``moe:`` section of a recipe: the experts become the experts of MoE layers (see
    ``mergecli.moe``). LoRA adapters make an Arrow MoE (peft), full fine-tunes a sparse MoE
    model (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    top_k: int = Field(2, ge=1, validation_alias=AliasChoices("top_k", "experts_per_token"))
    """Experts routed per token (Arrow's top_k, the sparse model's experts_per_token)."""
    router_temperature: float = Field(1.0, gt=0)
    """Arrow: the softmax temperature of the router."""
    general: list[str] = Field(default_factory=list)
    """Arrow: general-knowledge adapters subtracted from each expert (GenKnowSub)."""
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    """Sparse: how router rows are initialised, as mergekit-moe defines the modes."""
    architecture: Literal["mixtral", "qwen2_moe", "qwen3_moe"] | None = None
    """Sparse: the output class (default: from the base's model_type)."""
    shared_expert: str | None = None
    """Sparse, qwen2_moe: the model whose MLP is the shared expert (default: the base)."""
    prompts: dict[str, MoePrompts] = Field(default_factory=dict)
    """Sparse: routing prompts per expert name (hidden and cheap_embed gates)."""
    train_steps: int = Field(0, ge=0)
    """Sparse: steps of multi-task training of routers and experts (base tensors frozen)."""
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    train_data: str | None = None
    """Sparse: the training texts, a JSONL or text file per task ({task}: each expert's name)."""


class TokenSource(_Strict):
    """Where a token's embedding comes from in mergekit's ``tokenizer.tokens`` (a model's
    token, or ``kind: zero``)."""

    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


class TokenEmbedding(_Strict):
    """One entry of ``tokenizer.tokens``: the embedding source of a token (a model of the
    merge, whose row of that token is taken; a ``TokenSource``; or None: the default rule), and
    ``force``: every input takes it, even one that has the token."""

    source: TokenSource | str | None = None
    force: bool = False


class TokenizerSection(_Strict):
    """mergekit's ``tokenizer:`` section: the output vocabulary (``union``, ``base`` or a model
    folder, plus every token listed under ``tokens``), its embedding sources, and the embedding
    rows rounded up to a multiple of ``pad_to_multiple_of``."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)


class SliceSource(_Strict):
    """One input of an output slice (mergekit's ``InputSliceDefinition``): layers
    ``layer_range[0]`` to ``layer_range[1] - 1`` of a model, with its own parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputSlice(_Strict):
    """A run of output layers (mergekit's ``OutputSliceDefinition``): each layer merged from
    the same layer of every source, with the slice's base model and parameters."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    """A merge recipe. Relative paths are resolved against the recipe's folder (then the cwd)."""

    merge_method: str | None = None
    """Required, except in an MoE recipe where it merges the tensors outside the experts."""
    models: list[ModelEntry] = Field(default_factory=list)
    """The experts; a recipe gives either ``models`` or ``slices``."""
    slices: list[OutputSlice] | None = Field(None, min_length=1)
    """Layer ranges of several models stacked into a new depth (``mergecli.engine.slices``)."""
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    """``base`` (default), a model folder, or ``union``: every input's tokens (mergekit)."""
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    """A Jinja chat template written into the output's tokenizer_config.json, or ``auto``: the
    template most of the inputs have (mergekit's key)."""
    conventions: Conventions = "mergecli"
    """Whose defaults and behaviour methods follow: mergecli's (the papers') or mergekit
    0.1.5's (``mergecli.conventions``)."""
    seed: int = 0
    output: str | None = None
    on_missing: Literal["error", "base"] = "error"
    on_nonfinite: Literal["error", "warn"] = "error"
    """``warn``: merge tensors holding NaN/Inf anyway (one warning each) instead of stopping."""
    allow_bin: bool = False
    output_format: Literal["model", "lora"] = "model"
    """``lora``: write a PEFT LoRA adapter of the merged model over the base."""
    rank: int | None = Field(None, gt=0)
    """The LoRA output's rank where a merged delta is truncated by SVD."""
    report: Literal["full", "summary"] = "full"
    """``summary``: the merge report gives the totals only, without a row per tensor."""
    temporal: TemporalSection | None = None
    evaluate: EvaluateSection | None = None
    flex: FlexSection | None = None
    moe: MoeSection | None = None
    folder: Path = Field(default_factory=Path.cwd, exclude=True)

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The recipe as written: ``report`` only where it is not the default (so reports and
        cards of earlier recipes are unchanged)."""
        data: dict[str, Any] = handler(self)
        if self.report == "full":
            data.pop("report", None)
        return data

    def resolve_path(self, value: str) -> Path:
        """A recipe path: relative to the recipe's folder, else to the cwd, else as given."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        for root in (self.folder, Path.cwd()):
            if (root / path).exists():
                return (root / path).resolve()
        return self.folder / path

    def parameter_places(self) -> list[tuple[str, dict[str, Any], bool]]:
        """Every ``parameters`` mapping of the recipe: (its key, its values, whether it is a
        model's own), global first."""
        places = [("parameters", self.parameters, False)]
        places += [
            (f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(self.models)
        ]
        for i, part in enumerate(self.slices or []):
            places.append((f"slices[{i}].parameters", part.parameters, False))
            places += [
                (f"slices[{i}].sources[{j}].parameters", s.parameters, True)
                for j, s in enumerate(part.sources)
            ]
        return places

    def find_model(self, value: str) -> int | None:
        """The model a token source names (mergekit's model reference): -1 for the base, ``i``
        for ``models[i]``, matched by the recipe's text, the expert's ``name`` or the same
        resolved path; None when it names none of them."""
        named: list[tuple[int, str, str | None]] = (
            [(-1, self.base_model, None)] if self.base_model else []
        )
        named += [(i, m.model, m.name) for i, m in enumerate(self.models)]
        for index, model, name in named:
            if value in (model, name):
                return index
        path = self.resolve_path(value)
        for index, model, _ in named:
            if path.exists() and self.resolve_path(str(model)) == path:
                return index
        return None

    def model_name(self, index: int) -> str:
        """The expert's task name (one rule for every command): ``models[i].name``, else the
        folder's name, else (when another expert's folder has the same name) the shortest
        trailing part of its path that tells them apart (``runA/step-800``); a name that an
        earlier expert already has (an expert listed twice, a ``name`` given twice) gets ``#i``,
        its index."""
        return self.task_names()[index]

    def task_names(self) -> list[str]:
        """``model_name`` of every expert, in order."""
        parts = [Path(m.model.rstrip("/").split("@")[0]).parts or ("",) for m in self.models]
        unnamed = [i for i, m in enumerate(self.models) if not m.name]
        names = []
        for i, entry in enumerate(self.models):
            if entry.name:
                names.append(entry.name)
                continue
            own, k = parts[i], 1
            while k < len(own) and any(
                parts[j][-k:] == own[-k:] and parts[j] != own for j in unnamed if j != i
            ):
                k += 1
            names.append("/".join(own[-k:]))
        return [f"{name}#{i}" if name in names[:i] else name for i, name in enumerate(names)]


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where a validation error points (for its "did you mean")."""
    sections: dict[str, type[BaseModel]] = {
        "models": ModelEntry,
        "temporal": TemporalSection,
        "evaluate": EvaluateSection,
        "tasks": EvalTask,
        "flex": FlexSection,
        "moe": MoeSection,
        "prompts": MoePrompts,
        "tokenizer": TokenizerSection,
        "slices": OutputSlice,
        "sources": SliceSource,
    }
    model: type[BaseModel] = Recipe
    for part in loc:
        model = sections.get(part, model) if isinstance(part, str) else model
    return [n for n in model.model_fields if n != "folder"]


def recipe_from_dict(data: Any, folder: Path | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; one-line RecipeError naming the key on any problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys (merge_method, models, ...)")
    try:
        recipe = Recipe.model_validate({**data, "folder": folder or Path.cwd()})
    except ValidationError as exc:
        # a misspelt key also makes the right one "missing": report the misspelling first
        err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        loc = tuple(err["loc"])
        where = _location(loc)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            hint = did_you_mean(key, _fields_at(loc[:-1]))
            raise RecipeError(f"{source}: unknown key '{where}'{hint}", key=where) from None
        if err["type"] == "missing":
            raise RecipeError(f"{source}: missing required key '{where}'", key=where) from None
        raise RecipeError(f"{source}: {where}: {err['msg']}", key=where) from None
    check_slices(recipe, source)
    if recipe.merge_method is None and recipe.moe is None:
        raise RecipeError(f"{source}: missing required key 'merge_method'", key="merge_method")
    section = recipe.evaluate
    if section is not None and (section.metric is None) == (section.command is None):
        raise RecipeError(
            f"{source}: evaluate: give exactly one of 'metric' and 'command'", key="evaluate"
        )
    for key, value in recipe.parameters.items():
        check_value(value, f"parameters.{key}", source)
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            check_value(value, f"models[{i}].parameters.{key}", source)
    check_tokenizer(recipe, source)
    check_chat_template(recipe.chat_template, source)
    if recipe.rank is not None and recipe.output_format != "lora":
        raise RecipeError(f"{source}: rank: only used with output_format: lora", key="rank")
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is None:
            continue
        value = DTYPE_ALIASES.get(value, value)
        if value not in DTYPES:
            raise RecipeError(
                f"{source}: {key}: unknown dtype '{value}'{did_you_mean(value, DTYPES)}", key=key
            )
        if value != getattr(recipe, key):  # an alias: assigning marks the key as set
            setattr(recipe, key, value)
    return recipe


def check_slices(recipe: Recipe, source: str) -> None:
    """Exactly one of ``models`` and ``slices`` (as in mergekit); slices only in a plain merge;
    their parameter values checked like the others."""
    if not recipe.models and not recipe.slices:
        raise RecipeError(f"{source}: missing required key 'models' (or 'slices')", key="models")
    if recipe.slices is None:
        return
    if recipe.models:
        raise RecipeError(
            f"{source}: give 'models' or 'slices', not both (as in mergekit)", key="slices"
        )
    for key in ("temporal", "flex", "moe", "evaluate"):
        if getattr(recipe, key) is not None:
            raise RecipeError(f"{source}: slices: not with a '{key}' section", key="slices")
    if recipe.output_format != "model":
        raise RecipeError(
            f"{source}: slices: a stacked model is written as a model folder, not "
            f"output_format: {recipe.output_format}",
            key="output_format",
        )
    if recipe.tokenizer is not None or recipe.tokenizer_source == "union":
        key = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
        raise RecipeError(
            f"{source}: {key}: a new vocabulary (union, the tokenizer section) is not supported "
            "with slices; give tokenizer_source: base or a model",
            key=key,
        )
    for i, part in enumerate(recipe.slices):
        for key, value in part.parameters.items():
            check_value(value, f"slices[{i}].parameters.{key}", source)
        for j, src in enumerate(part.sources):
            for key, value in src.parameters.items():
                check_value(value, f"slices[{i}].sources[{j}].parameters.{key}", source)


def check_tokenizer(recipe: Recipe, source: str) -> None:
    """The tokenizer keys, as mergekit takes them: ``tokenizer_source`` or the ``tokenizer``
    section (not both), its source, and each token's embedding source."""
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise RecipeError(
            f"{source}: give 'tokenizer' or 'tokenizer_source', not both (as in mergekit)",
            key="tokenizer",
        )
    if recipe.tokenizer is None:
        check_vocabulary_source(recipe, recipe.tokenizer_source, "tokenizer_source", source)
        return
    check_vocabulary_source(recipe, recipe.tokenizer.source, "tokenizer.source", source)
    for token, entry in (recipe.tokenizer.tokens or {}).items():
        check_token_source(recipe, entry.source, f"tokenizer.tokens.{token}.source", source)


def check_vocabulary_source(recipe: Recipe, value: str | None, key: str, source: str) -> None:
    """``base``, ``union`` or an existing folder (whose tokenizer the output takes)."""
    if value in (None, "base", "union") or recipe.resolve_path(str(value)).is_dir():
        return
    raise RecipeError(
        f"{source}: {key}: '{value}' is neither 'base', 'union' nor an existing folder", key=key
    )


def check_token_source(
    recipe: Recipe, value: TokenSource | str | None, key: str, source: str
) -> None:
    """A token's embedding source names one of the recipe's models (and, for ``model_token``,
    exactly one of ``token_id`` and ``token``); ``kind: zero`` takes nothing else."""
    if isinstance(value, str):
        check_model_reference(recipe, value, key, source)
        return
    if value is None:
        return
    if value.kind == "zero":
        given = [k for k in ("model", "token_id", "token") if getattr(value, k) is not None]
        if given:
            raise RecipeError(f"{source}: {key}: kind zero takes no '{given[0]}'", key=key)
        return
    if value.model is None:
        raise RecipeError(f"{source}: {key}: kind model_token needs 'model'", key=f"{key}.model")
    check_model_reference(recipe, value.model, f"{key}.model", source)
    if (value.token_id is None) == (value.token is None):
        raise RecipeError(
            f"{source}: {key}: kind model_token needs exactly one of 'token_id' and 'token'",
            key=key,
        )


def check_model_reference(recipe: Recipe, value: str, key: str, source: str) -> None:
    """``value`` names the base or an expert (``Recipe.find_model``)."""
    if recipe.find_model(value) is None:
        names = [m for m in (recipe.base_model, *(e.model for e in recipe.models)) if m]
        raise RecipeError(
            f"{source}: {key}: '{value}' is not a model of this merge{did_you_mean(value, names)}",
            key=key,
        )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"recipe '{path}' does not exist", path=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return recipe_from_dict(data, path.parent.resolve(), str(path))
