"""The seeded, one-thread context every tiny model is initialised and trained in."""
from __future__ import annotations

import contextlib

from sasi_online.utils import derive_seed


@contextlib.contextmanager
def _deterministic(seed: int, name: str):
    """Seed torch for one model and run on one thread, so bytes do not depend on the host."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(derive_seed("zoo", seed, name))
    try:
        yield torch.Generator().manual_seed(derive_seed("zoo-gen", seed, name))
    finally:
        torch.set_num_threads(threads)
