"""`sasi zoo build DIR [--seed 0]`: write the tiny model set; `sasi zoo verify DIR`: check it."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build the tiny model set (Hugging Face layout) into DIR")
    build.add_argument("dir", help="output folder, e.g. tiny-zoo (models.root)")
    build.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    build.add_argument("--force", action="store_true",
                       help="rebuild even if DIR already holds this zoo, or replace a non-zoo folder")
    verify = sub.add_parser("verify", help="compare every file in DIR with the sha256 in its zoo.json")
    verify.add_argument("dir")


def run(args: argparse.Namespace) -> int:
    from sasi_online.utils import limit_threads
    from sasi_online.zoo import build_zoo, verify_zoo

    limit_threads()
    if args.action == "build":
        path = build_zoo(args.dir, seed=args.seed, force=args.force)
        print(f"tiny model zoo ready at {path}")
        return 0
    bad = verify_zoo(args.dir)
    if bad:
        print(f"{len(bad)} file(s) differ from zoo.json: " + ", ".join(bad[:10]))
        return 1
    print(f"{args.dir}: every file matches zoo.json")
    return 0
