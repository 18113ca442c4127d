"""A batch file: several named recipes, where one may use another's output as an input.

The format is mergekit-multi's: a multi-document YAML (or one document holding a list), each
recipe with a ``name``. A ``base_model``, ``models[].model``, ``slices[].sources[].model`` (or
a slice's ``base_model``) or ``tokenizer_source`` equal to another recipe's name stands for that
recipe's output folder and makes it a dependency. At most one recipe may go without a name
(mergekit's final merge); it is called ``final`` and needs an ``output`` (or ``--output``). A
named recipe writes to its ``output``, else ``WORK_DIR/NAME``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergecli.errors import RecipeError, SourceError
from mergecli.recipe import Recipe, recipe_from_dict

FINAL = "final"
"""The name of the recipe given without one."""


@dataclass(frozen=True)
class BatchRecipe:
    """One recipe of a batch: its name, validated recipe, output folder and the names of the
    recipes whose outputs it reads."""

    name: str
    recipe: Recipe
    output: Path
    needs: tuple[str, ...]


@dataclass(frozen=True)
class Batch:
    """The recipes of a batch file in an order where every recipe follows those it needs."""

    path: Path
    recipes: tuple[BatchRecipe, ...]

    def get(self, name: str) -> BatchRecipe:
        return next(r for r in self.recipes if r.name == name)

    def dependants(self, name: str) -> list[str]:
        """Every recipe that needs ``name``, directly or through another."""
        out: list[str] = []
        for entry in self.recipes:
            if any(n == name or n in out for n in entry.needs):
                out.append(entry.name)
        return out

    def graph(self) -> list[dict[str, Any]]:
        """The dependency graph, in run order (what ``--dry-run`` prints)."""
        return [
            {
                "name": r.name,
                "method": r.recipe.merge_method,
                "needs": list(r.needs),
                "output": str(r.output),
            }
            for r in self.recipes
        ]


def _documents(path: Path) -> list[Any]:
    if not path.is_file():
        raise SourceError(f"batch file '{path}' does not exist", path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if len(docs) == 1 and isinstance(docs[0], list):
        docs = docs[0]
    if not docs:
        raise RecipeError(f"{path}: no recipes (give YAML documents separated by '---')")
    return docs


def _named(path: Path, docs: list[Any]) -> dict[str, dict[str, Any]]:
    """Recipe mappings by name, in file order."""
    named: dict[str, dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RecipeError(f"{path}: recipe {i + 1} is not a mapping of keys", key=f"[{i}]")
        doc = dict(doc)
        name = doc.pop("name", FINAL)
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise RecipeError(
                f"{path}: recipe {i + 1}: name: expected a folder name, got {name!r}",
                key=f"[{i}].name",
            )
        if name in named:
            what = "more than one recipe without a name" if name == FINAL else f"'{name}' twice"
            raise RecipeError(f"{path}: {what}", key=f"[{i}].name")
        named[name] = doc
    return named


def _references(doc: dict[str, Any]) -> list[tuple[tuple[str | int, ...], Any]]:
    """The (path of keys, value) pairs of a recipe mapping that may name a model folder."""
    refs: list[tuple[tuple[str | int, ...], Any]] = [
        (("base_model",), doc.get("base_model")),
        (("tokenizer_source",), doc.get("tokenizer_source")),
    ]
    for i, m in enumerate(_dicts(doc.get("models"))):
        refs.append((("models", i, "model"), m.get("model")))
    for i, part in enumerate(_dicts(doc.get("slices"))):
        refs.append((("slices", i, "base_model"), part.get("base_model")))
        for j, source in enumerate(_dicts(part.get("sources"))):
            refs.append((("slices", i, "sources", j, "model"), source.get("model")))
    return [(key, value) for key, value in refs if isinstance(value, str)]


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The entries of a recipe list (non-mappings as empty ones, keeping the indices)."""
    return [m if isinstance(m, dict) else {} for m in value] if isinstance(value, list) else []


def _substitute(doc: dict[str, Any], outputs: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
    """The mapping with other recipes' names replaced by their output folders, and those names."""
    doc = copy.deepcopy(doc)
    needs: list[str] = []
    for path, value in _references(doc):
        if value not in outputs:
            continue
        needs.append(value)
        holder: Any = doc
        for part in path[:-1]:
            holder = holder[part]
        holder[path[-1]] = str(outputs[value])
    return doc, list(dict.fromkeys(needs))


def _ordered(path: Path, needs: dict[str, list[str]]) -> list[str]:
    """File order, moved only where a recipe must follow what it needs; a cycle is an error."""
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " → ".join([*visiting[visiting.index(name) :], name])
            raise RecipeError(f"{path}: recipes depend on each other in a cycle: {cycle}")
        visiting.append(name)
        for dep in needs[name]:
            visit(dep)
        visiting.pop()
        done.append(name)

    for name in needs:
        visit(name)
    return done


def load_batch(
    path: str | Path, work_dir: str | Path | None = None, output: str | Path | None = None
) -> Batch:
    """Read and validate a batch file (every recipe, before anything runs).

    ``work_dir`` holds the outputs of named recipes without an ``output`` (default: the batch
    file's folder); ``output`` is the folder of the unnamed recipe (overrides its ``output``).
    """
    path = Path(path)
    folder = path.parent.resolve()
    named = _named(path, _documents(path))
    root = Path(work_dir).resolve() if work_dir is not None else folder
    outputs: dict[str, Path] = {}
    for name, doc in named.items():
        given = output if name == FINAL and output is not None else doc.get("output")
        if given is None and name == FINAL:
            raise RecipeError(
                f"{path}: the recipe without a name needs 'output' (or --output)", key="output"
            )
        if given is not None and not isinstance(given, str | Path):
            raise RecipeError(f"{path}: recipe '{name}': output: expected a folder", key="output")
        outputs[name] = (folder / Path(given).expanduser()).resolve() if given else root / name
    taken: dict[Path, str] = {}
    for name, target in outputs.items():
        if target in taken:
            raise RecipeError(
                f"{path}: recipes '{taken[target]}' and '{name}' both write to {target}",
                key="output",
            )
        taken[target] = name
    entries: dict[str, BatchRecipe] = {}
    needs: dict[str, list[str]] = {}
    for name, doc in named.items():
        resolved, needs[name] = _substitute(doc, outputs)
        if name in needs[name]:
            raise RecipeError(f"{path}: recipe '{name}' uses its own output", key=name)
        resolved["output"] = str(outputs[name])
        recipe = recipe_from_dict(resolved, folder, f"{path}: recipe '{name}'")
        entries[name] = BatchRecipe(name, recipe, outputs[name], tuple(needs[name]))
    return Batch(path, tuple(entries[n] for n in _ordered(path, needs)))
