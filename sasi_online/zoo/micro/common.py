"""What every micro-model trainer shares: the seeded step loop with its progress bar and
log lines, batch sampling, and the random tiny model a trainer starts from."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger("sasi_online.zoo.micro")


def run_steps(name: str, steps: int, step: Callable[[int], Any], log_every: int = 100) -> float:
    """Call `step(i)` for i < steps (it returns the loss tensor) under a progress bar; the
    loss is read back (a host sync) only on log steps. Returns the last logged loss."""
    from tqdm.auto import tqdm

    last = float("nan")
    t0 = time.perf_counter()
    with tqdm(range(steps), desc=f"train {name}", unit="step", disable=None) as bar:
        for i in bar:
            loss = step(i)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                last = float(loss)
                bar.set_postfix(loss=f"{last:.3f}")
                log.info("%s step %d/%d loss %.4f (%.0f s)", name, i + 1, steps, last,
                         time.perf_counter() - t0)
    return last


def batches(rng: np.random.Generator, n: int, batch: int):
    """An endless stream of index batches: shuffled epochs over range(n)."""
    while True:
        order = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            yield order[s:s + batch]


def warmup_cosine(opt, steps: int, warmup: int = 50):
    import math

    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def random_start(build: Callable[[Path], None], folder: str) -> Path:
    """Build one random tiny model with the zoo's own builder (its configs, tokenizer and
    processor) into a temporary folder; returns that model's folder."""
    tmp = Path(tempfile.mkdtemp(prefix="sasi-micro-"))
    build(tmp)
    return tmp / folder


def save_model(model: Any, extra: Any, src: Optional[Path], out: Path) -> None:
    """Save `model` (and its processor/tokenizer `extra`) to `out` atomically; drop the
    temporary folder of `src` (the random start), if any."""
    tmp = out.with_name(f".{out.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp, safe_serialization=True)
    if extra is not None:
        extra.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if src is not None:
        shutil.rmtree(src.parent, ignore_errors=True)
