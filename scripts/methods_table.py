"""Print the README's methods table from the registry (``python -m scripts.methods_table``),
or with ``--conventions`` docs/methods.md's table of what ``conventions: mergekit`` changes.

``--check README.md`` (or ``--conventions --check docs/methods.md``) exits non-zero when the
file's table differs from the registry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergecli.conventions import BEHAVIOUR, differing_params
from mergecli.methods import REQUIRED, list_methods

BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
CONVENTIONS_BEGIN = "<!-- conventions-table:begin -->"
CONVENTIONS_END = "<!-- conventions-table:end -->"


def _default(value: object) -> str:
    return "required" if value is REQUIRED else f"`{value}`"


def methods_table() -> str:
    rows = ["| method | definition | parameters (default) | convention |", "|---|---|---|---|"]
    for spec in list_methods():
        params = "<br>".join(
            f"`{p.name}`{' (per model)' if p.per_model else ''} = {_default(p.default)}"
            for p in spec.params
        )
        cells = [f"`{spec.name}`", spec.summary, params or "–", spec.convention or "–"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def conventions_table() -> str:
    """Every difference between the two conventions: recipe-level rules, then per method the
    parameters whose defaults differ and the behaviour mergekit's conventions change."""
    rows = ["| where | what | mergecli | mergekit 0.1.5 |", "|---|---|---|---|"]
    rows += [f"| recipe | {what} | {ours} | {theirs} |" for what, ours, theirs in BEHAVIOUR]
    rows.append(compute_row())
    for spec in list_methods():
        for p in differing_params(spec):
            rows.append(f"| `{spec.name}` | `{p.name}` default | `{p.default}` | `{p.mergekit}` |")
        if spec.mergekit:
            behaviour = f"| `{spec.name}` | behaviour | as in the methods table | {spec.mergekit} |"
            rows.append(behaviour)
        if spec.mergekit_models:
            least, most = spec.mergekit_models
            rows.append(
                f"| `{spec.name}` | models | {spec.min_models}–{spec.max_models or 'any'} experts "
                f"| {least}–{most or 'any'} besides the base |"
            )
    return "\n".join(rows)


def compute_row() -> str:
    """The compute dtype under each convention, from ``MethodSpec.mergekit_compute``."""
    in_dtype = ", ".join(f"`{s.name}`" for s in list_methods() if s.mergekit_compute == "dtype")
    upcast = "float32 (float64 when dtype is float64)"
    return (
        f"| recipe | compute dtype | {upcast} | dtype (unset: the dtype tensors are stored in) "
        f"for {in_dtype}; {upcast} for the others |"
    )


def readme_table(readme: str, begin: str = BEGIN, end: str = END) -> str:
    return readme.split(begin, 1)[1].split(end, 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", type=Path, help="README to compare against")
    parser.add_argument("--conventions", action="store_true", help="the conventions table")
    args = parser.parse_args()
    table = conventions_table() if args.conventions else methods_table()
    marks = (CONVENTIONS_BEGIN, CONVENTIONS_END) if args.conventions else (BEGIN, END)
    if args.check:
        ok = readme_table(args.check.read_text(), *marks) == table
        print("table up to date" if ok else f"{args.check}: table is stale")
        sys.exit(0 if ok else 1)
    print(table)


if __name__ == "__main__":
    main()
