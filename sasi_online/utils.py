"""Small shared helpers: atomic writes, seeds, thread limits, image grids.

Look here before writing a helper of your own.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


class DiskFullError(OSError):
    """The disk filled up; what was written before stays consistent."""


def _disk_full(path: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device while writing '{path}'. Free some space "
        f"(or point the output elsewhere) and run the same command again: it resumes.",
    )


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (the lock keeps our own threads out)
        old = os.umask(0o022)
        os.umask(old)
    return old


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`.

    The file gets the mode a plain `open()` would (0o666 less the umask), not
    mkstemp's 0o600: teammates sharing a store or a run can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), plain_file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno == errno.ENOSPC:
            raise _disk_full(path, exc) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def chunked(items: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), without holding the rest."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of values (same across processes and runs)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def limit_threads(n: int | None = None) -> None:
    """One thread per process unless OMP_NUM_THREADS says otherwise.

    On small shared machines torch's default of one thread per core made small work
    10-300x slower under load.
    """
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


def child_env(**extra: str) -> dict:
    """The environment for a child process of the project (a launcher, a bench's run): one
    thread per process unless set, and never the checkout's top folder on PYTHONPATH, where
    its `kernels/` would shadow the Hugging Face package that transformers imports. The child
    finds `sasi_online` where it is installed (`pip install -e .` for a checkout)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    top = Path(__file__).resolve().parents[1]
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != top]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def to_uint8_hwc(image: Any) -> np.ndarray:
    """PIL image, HWC uint8 array, or CHW float tensor in [0, 1] → HWC uint8 RGB array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        arr = (t.clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr.astype(np.uint8)


def save_grid(rows: list[list[Any]], path: str | Path, titles: Iterable[str] | None = None,
              row_labels: Iterable[str] | None = None, cell: int = 96) -> Path:
    """Save a grid PNG: one row per item, one column per stage (real | prompt | SASI ...).

    Cells are images (anything `to_uint8_hwc` takes) or strings (drawn as wrapped text).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    nrows = len(rows)
    ncols = max(len(r) for r in rows) if rows else 1
    titles = list(titles or [])
    row_labels = list(row_labels or [])
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell / 48, nrows * cell / 48 + 0.3),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            item = row[j]
            if isinstance(item, str):
                ax.text(0.02, 0.98, textwrap.fill(item, 28), va="top", ha="left", fontsize=6,
                        transform=ax.transAxes, wrap=True)
                for s in ax.spines.values():
                    s.set_visible(False)
            else:
                ax.imshow(to_uint8_hwc(item), interpolation="nearest")
            if i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=8)
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=96)
