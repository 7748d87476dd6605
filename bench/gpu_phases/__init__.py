"""Phases of bench/gpu_check.py: each a module with `run(args, out_dir) -> list[dict]`.

`args` is gpu_check's namespace (`.tiny`, `.out`, `.zoo`, `.seconds`, ...); `out_dir` is the
phase's own folder. A phase returns its rows (plain dicts: images/s, SASI/s, ring hit
rate, peak GPU memory, seconds ...) and raises `MissingPackage` when it cannot run for
want of a package (gpu_check then exits non-zero, naming it), or anything else on failure.
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

# The order they run in: kernels before generate, so a slow compile cannot starve it.
PHASES = ("train", "online", "kernels", "generate")
# Each phase's own limit in seconds (full size, one H100). A phase checks it between its
# sections; a compile runs in a child process killed at its share; run_phase reports a
# phase that ran past it. SETUP_SECONDS covers what runs before the first phase (wheel
# install, Triton probe). Setup plus the phases is the run's budget: 7 minutes
# (tests/test_gpu_check.py checks the sum).
SETUP_SECONDS = 20.0
PHASE_SECONDS = {"train": 60.0, "online": 110.0, "kernels": 40.0, "generate": 190.0}
TINY_PHASE_SECONDS = {"train": 120.0, "online": 180.0, "kernels": 60.0, "generate": 120.0}
# bf16 dense tensor-core peak, TFLOP/s, from the vendors' data sheets (no sparsity); matched
# against torch.cuda.get_device_name, most specific first.
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))
# import name -> the wheel that provides it, where the two differ
WHEEL_OF = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "google": "protobuf",
            "huggingface_hub": "huggingface-hub", "cpuinfo": "py-cpuinfo", "pydantic_core": "pydantic-core",
            "typing_inspection": "typing-inspection", "annotated_types": "annotated-types"}


class MissingPackage(RuntimeError):
    """The phase needs a package this machine lacks (bring it with --wheels DIR)."""


def require(*modules: str) -> None:
    """Import each module as the phase will; a missing one (or one its import needs) raises
    MissingPackage naming the wheel to bring, e.g. "skipped: bring wheel requests (needed
    by diffusers)"."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = (exc.name or name).split(".")[0]
            wheel = WHEEL_OF.get(top, top.replace("_", "-"))
            missing.append(wheel if top == name.split(".")[0] else f"{wheel} (needed by {name})")
    if missing:
        raise MissingPackage(f"skipped: bring wheel(s) {', '.join(missing)}: build the folder with "
                             f"bench/gpu_wheels.py and pass --wheels DIR (README: 'GPU check')")


def run_limited(argv: list[str], limit_s: float, log_path: Path, env: dict | None = None) -> int | None:
    """Run `argv` in its own process group, output to `log_path`; at `limit_s` the whole
    group (the child and any compile workers it started) is killed. Returns the exit
    status, or None when the limit killed it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(limit_s, 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def spec_peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(bf16 dense spec peak in TFLOP/s or None, a sentence saying which) for a device name."""
    for key, tflops in SPEC_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, f"{key} bf16 dense spec peak, {tflops:.0f} TFLOP/s"
    return None, (f"'{device_name}' is not in the spec table (gpu_phases.SPEC_BF16_TFLOPS): MFU is against "
                  f"the measured matmul rate only")


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
