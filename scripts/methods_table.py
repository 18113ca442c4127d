"""Print the README's methods table from the registry (``python -m scripts.methods_table``).

``--check README.md`` exits non-zero when the README's table differs from the registry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergecli.methods import REQUIRED, list_methods

BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


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


def readme_table(readme: str) -> str:
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", type=Path, help="README to compare against")
    args = parser.parse_args()
    if args.check:
        ok = readme_table(args.check.read_text()) == methods_table()
        print("methods table up to date" if ok else "README methods table is stale")
        sys.exit(0 if ok else 1)
    print(methods_table())


if __name__ == "__main__":
    main()
