"""The micro LLaMA: the zoo's tiny LLaMA trained far longer on the same few-shot SRP
completion (sasi_online.zoo.tiny_lm), so that its rewrites keep the caption's garment."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

STEPS = 1500


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int, steps: int = STEPS) -> dict:
    """Text only: the captions it learns to rewrite are the ones the micro BLIP-2 writes
    for these images (`images` and `labels` are unused)."""
    from ..tiny_lm import _build_llama

    tmp = Path(tempfile.mkdtemp(prefix="sasi-micro-"))
    try:
        _build_llama(tmp, seed, steps)  # seeded, one thread, logs its last loss
        target = out / "llama"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(tmp / "llama"), str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"steps": steps}
