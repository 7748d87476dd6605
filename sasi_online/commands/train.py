"""`sasi train`: train an encoder in one process (the same code DeepSpeed launches)."""
from __future__ import annotations

import argparse

from sasi_online import train as trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    trainer.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return trainer.run(args)
