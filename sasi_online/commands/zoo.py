"""`sasi zoo build DIR`: write the micro model set shipped with the package (default; `--random`:
the random tiny set); `sasi zoo verify DIR`: check it; `sasi zoo train-micro`: train the micro set."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build", help="write a model set into DIR: the trained micro set (default) or --random",
        description="Write a complete model set in Hugging Face layout into DIR (models.root), in seconds and "
                    "byte-identically. By default the micro set shipped with the package: models trained once "
                    "on Fashion-MNIST's 60,000 training images (`--micro` says so explicitly). "
                    "--random writes the random tiny set instead (random diffusion models, briefly trained "
                    "captioner and rewriter; --seed picks it): every code path, no meaning.")
    build.add_argument("dir", help="output folder, e.g. tiny-zoo (models.root)")
    kind = build.add_mutually_exclusive_group()
    kind.add_argument("--micro", dest="kind", action="store_const", const="micro",
                      help="the micro set shipped with the package, trained on Fashion-MNIST (the default)")
    kind.add_argument("--random", dest="kind", action="store_const", const="random",
                      help="the random tiny set instead: random weights, briefly trained captioner and "
                           "rewriter; --seed chooses it")
    build.set_defaults(kind="micro")
    build.add_argument("--seed", type=int, default=0,
                       help="seed of the random models (same seed, same bytes): the whole --random set; "
                            "in the micro set only the models it does not ship, if any")
    build.add_argument("--force", action="store_true",
                       help="rebuild even if DIR already holds this zoo, or replace a non-zoo folder")
    verify = sub.add_parser("verify", help="compare every file in DIR with the sha256 in its zoo.json")
    verify.add_argument("dir")
    from sasi_online.zoo.micro.data import DEFAULT_DATA

    train = sub.add_parser(
        "train-micro", help="train the micro set on Fashion-MNIST's 60,000 training images",
        description="Train the micro model set from Fashion-MNIST's native idx files (install them with "
                    "`apt-get install dataset-fashion-mnist`). Seeded; one model after the other; "
                    "a rerun keeps the models already trained in OUT (resume). Writes OUT/<model>/, "
                    "train.json, train.log and zoo.json.")
    train.add_argument("--data", default=DEFAULT_DATA, help=f"folder with the idx(.gz) files (default {DEFAULT_DATA})")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--seed", type=int, default=0, help="seed of every initialisation and batch order")
    train.add_argument("--only", default=None, help="comma-separated models to train (default: all)")
    train.add_argument("--force", action="store_true", help="retrain models already trained in OUT")


def _train(args: argparse.Namespace) -> int:
    from sasi_online.zoo.micro import train_micro

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    out = train_micro(args.data, args.out, seed=args.seed, only=only, force=args.force)
    print(f"micro model set trained in {out} (log: {out / 'train.log'})")
    return 0


def run(args: argparse.Namespace) -> int:
    from sasi_online.utils import limit_threads
    from sasi_online.zoo import build_zoo, verify_zoo

    limit_threads()
    if args.action == "train-micro":
        return _train(args)
    if args.action == "build":
        if args.kind == "micro":
            from sasi_online.zoo.micro.ship import build_micro

            path = build_micro(args.dir, seed=args.seed, force=args.force)
            print(f"micro model zoo ready at {path}")
            return 0
        path = build_zoo(args.dir, seed=args.seed, force=args.force)
        print(f"random tiny model zoo ready at {path}")
        return 0
    bad = verify_zoo(args.dir)
    if bad:
        print(f"{len(bad)} file(s) differ from zoo.json: " + ", ".join(bad[:10]))
        return 1
    print(f"{args.dir}: every file matches zoo.json")
    return 0
