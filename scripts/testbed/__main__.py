"""``python -m scripts.testbed build OUT [--reduced] [--seed 0]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.testbed.build import build


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the testbed into an empty folder")
    build_cmd.add_argument("out", type=Path)
    build_cmd.add_argument("--reduced", action="store_true", help="the seconds-long test build")
    build_cmd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build(args.out, reduced=args.reduced, seed=args.seed)
    manifest = json.loads((out / "testbed.json").read_text())
    print(json.dumps(manifest["average_test_accuracy"], indent=2))


if __name__ == "__main__":
    main()
