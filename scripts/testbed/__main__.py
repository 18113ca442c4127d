"""``python -m scripts.testbed build OUT [--reduced] [--seed 0]`` builds the testbed;
``python -m scripts.testbed figures TESTBED [--docs docs] [--parts methods,flex,durations]``
draws its figures with mergecli (docs/testbed.md), building the testbed first if needed;
``python -m scripts.testbed train TESTBED --task T --init DIR --output DIR`` fine-tunes one task
from any checkpoint (the ``temporal.train`` command of ``mergecli temporal evaluate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.testbed.branches import train_branches
from scripts.testbed.build import build
from scripts.testbed.figures import PARTS, figures
from scripts.testbed.train import train_expert


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the testbed into an empty folder")
    build_cmd.add_argument("out", type=Path)
    build_cmd.add_argument("--reduced", action="store_true", help="the seconds-long test build")
    build_cmd.add_argument("--seed", type=int, default=0)
    figures_cmd = commands.add_parser("figures", help="figures and tables of a built testbed")
    figures_cmd.add_argument("testbed", type=Path, help="a built testbed (built here if absent)")
    figures_cmd.add_argument("--docs", type=Path, default=Path("docs"))
    figures_cmd.add_argument("--parts", default=",".join(PARTS))
    train_cmd = commands.add_parser("train", help="fine-tune one task from a checkpoint")
    train_cmd.add_argument("testbed", type=Path)
    train_cmd.add_argument("--task", required=True)
    train_cmd.add_argument("--init", type=Path, required=True, help="checkpoint to start from")
    train_cmd.add_argument("--output", type=Path, required=True)
    branches_cmd = commands.add_parser("branches", help="two branches of a task at (η, B)")
    branches_cmd.add_argument("testbed", type=Path)
    branches_cmd.add_argument("--task", required=True)
    branches_cmd.add_argument("--lr", type=float, required=True, help="learning rate η")
    branches_cmd.add_argument("--batch-size", type=int, required=True, help="batch size B")
    branches_cmd.add_argument("--output", type=Path, required=True, help="folder of settings")
    args = parser.parse_args()
    if args.command == "branches":
        print(train_branches(args.testbed, args.task, args.lr, args.batch_size, args.output))
        return
    if args.command == "train":
        print(train_expert(args.testbed, args.task, args.init, args.output))
        return
    if args.command == "figures":
        parts = tuple(p for p in args.parts.split(",") if p)
        unknown = set(parts) - set(PARTS)
        if unknown:
            parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {PARTS}")
        if not (args.testbed / "testbed.json").exists():
            build(args.testbed)
        results = figures(args.testbed, args.docs, parts)
        print(json.dumps({k: v for k, v in results.items() if k != "durations"}, indent=2))
        return
    out = build(args.out, reduced=args.reduced, seed=args.seed)
    manifest = json.loads((out / "testbed.json").read_text())
    print(json.dumps(manifest["average_test_accuracy"], indent=2))


if __name__ == "__main__":
    main()
