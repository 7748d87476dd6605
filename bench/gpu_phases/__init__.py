"""Phases of bench/gpu_check.py: each a module with `run(args, out_dir) -> list[dict]`.

`args` is gpu_check's namespace (`.tiny`, `.out`, `.zoo`, `.seconds`, ...); `out_dir` is the
phase's own folder. A phase returns its rows (plain dicts: images/s, SASI/s, ring hit
rate, peak GPU memory, seconds ...) and raises `MissingPackage` when it cannot run for
want of a package (gpu_check then exits non-zero, naming it), or anything else on failure.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

import torch

PHASES = ("train", "online", "generate", "kernels")


class MissingPackage(RuntimeError):
    """The phase needs a package this machine lacks (bring it with --wheels DIR)."""


def require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise MissingPackage(f"missing package(s): {', '.join(missing)}; put their wheels in a folder "
                             f"and pass --wheels DIR (README: 'GPU check')")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable, dev: torch.device, max_seconds: float, warmup: int = 2, min_iters: int = 2,
              max_iters: int = 50) -> float:
    """Mean seconds per call, after warm-up, stopping after `max_seconds` (at least min_iters)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n < min_iters or time.perf_counter() - t0 < max_seconds):
        fn()
        n += 1
        if dev.type == "cuda" and n % 5 == 0:
            sync(dev)
    sync(dev)
    return (time.perf_counter() - t0) / n


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else 0.0


def random_imagefolder(root: Path, images: int, side: int, classes: int = 10, seed: int = 0) -> Path:
    """A labelled image folder of random pictures (<root>/train/<class>/*.png): training
    data that needs no download. Reused when it already holds that many images."""
    import numpy as np
    from PIL import Image

    train = root / "train"
    if train.is_dir() and len(list(train.rglob("*.png"))) == images:
        return root
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = train / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(1, 1, 3))  # one colour per image plus noise: not all alike
        pixels = np.clip(base + rng.integers(-40, 40, size=(side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def train_rows(run_dir: Path) -> dict:
    """images/s (mean over the logged intervals after the first: start-up excluded)."""
    from sasi_online.training.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl", "images_per_s")
    steady = rows[1:] or rows
    return {"images_per_s": sum(r["images_per_s"] for r in steady) / max(len(steady), 1),
            "steps": rows[-1]["step"] if rows else 0, "last": rows[-1] if rows else {}}
