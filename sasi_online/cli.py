"""`sasi`: the command-line entry point.

Each sub-command lives in `sasi_online/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
command runs, so `sasi --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order a user meets them.
COMMANDS = {
    "zoo": ("sasi_online.commands.zoo", "build a model set (the trained micro set; --random: the random one), verify it, train-micro"),
    "semantics": ("sasi_online.commands.semantics", "captions, rewrites and visual prompts for a dataset, with a grid PNG"),
    "generate": ("sasi_online.commands.generate", "generate SASI into a resumable store"),
    "filter": ("sasi_online.commands.filter", "flag fishy SASI by CLIP similarity; plot the histogram"),
    "train": ("sasi_online.commands.train", "train an encoder on (real, SASI) pairs in one process"),
    "eval": ("sasi_online.commands.eval", "kNN, linear probe, semi-supervised, transfer, t-SNE and a report"),
    "demo": ("sasi_online.commands.demo", "the README's main job on the embedded data and the micro models"),
    "export": ("sasi_online.commands.export", "the trained backbone for torchvision, timm or detectron2"),
    "reproduce": ("sasi_online.commands.reproduce", "the paper's tables: run scripts, then their results beside the paper's"),
}


def build_parser(available: dict[str, tuple[str, str]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sasi",
        description="Contrastive self-supervised learning with semantic-aware synthetic images (SASI).",
        epilog="Run 'sasi COMMAND --help' for a command's options. --config takes a YAML path or a "
        "shipped name (tiny_cpu, imagenet100/byol, cifar10/swav: the configs/ folder, installed with "
        "the package); any config value can be overridden as section.key=value.",
    )
    from sasi_online import __version__

    parser.add_argument("--version", action="version", version=f"sasi_online {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in (COMMANDS if available is None else available).items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def unknown_command_message(name: str, available) -> str:
    """'unknown command', with the closest command name when there is one."""
    import difflib

    close = difflib.get_close_matches(name, list(available), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown command '{name}'.{hint} Choose from {', '.join(available)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in available:
        parser = build_parser(available)
        if argv and argv[0] == "--version":
            parser.parse_args(argv[:1])  # prints the version and exits
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(unknown_command_message(argv[0], available))
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    from sasi_online.utils import limit_threads

    limit_threads()  # one thread per process unless OMP_NUM_THREADS says otherwise
    module = importlib.import_module(available[name][0])
    parser = argparse.ArgumentParser(prog=f"sasi {name}", description=available[name][1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from sasi_online.config import ConfigError
    from sasi_online.errors import UserInputError

    try:
        return int(module.run(args) or 0)
    except (ConfigError, UserInputError) as exc:
        print(f"sasi {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
