"""Readers for datasets' native on-disk formats. Nothing here downloads.

CIFAR's python version is a pickle. Unpickling runs whatever callables the file
names, so it is done with an unpickler that resolves only numpy's array
reconstruction and plain builtin containers; any other global is refused.
"""
from __future__ import annotations

import builtins
import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sasi_online.errors import UserInputError


class UnsafePickleError(UserInputError):
    """A pickle that asks for something other than numpy arrays and builtin containers."""


def _numpy_multiarray():
    try:  # numpy >= 2 keeps the implementation in numpy._core
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


_MA = _numpy_multiarray()
# (module, name) → object. Old and new numpy module paths both appear in files.
_NUMPY_ALLOWED = {
    (mod, name): obj
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", _MA._reconstruct), ("scalar", _MA.scalar))
}
_NUMPY_ALLOWED.update({("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype})
# Python 3 pickles of bytes at protocol <= 2 go through codecs.encode(str, 'latin1').
_NUMPY_ALLOWED[("_codecs", "encode")] = codecs.encode
_SAFE_BUILTINS = frozenset({
    "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
    "float", "complex", "bool", "slice", "range",
})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction and builtin containers/scalars."""

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_ALLOWED:
            return _NUMPY_ALLOWED[(module, name)]
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise UnsafePickleError(
            f"'{self._source}' asks to load '{module}.{name}', which is not a numpy array or a "
            f"builtin container; refusing to unpickle it. Use the original dataset files "
            f"(the python version from the dataset's own site)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"'{self._source}' uses persistent ids; refusing to unpickle it")


def restricted_load(path: str | Path) -> Any:
    """Load a pickle file with `RestrictedUnpickler` (latin1 for Python-2-era files)."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=str(path), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise UserInputError(f"'{path}' is not a readable pickle ({exc}); re-extract the dataset") from exc


def _key(d: dict, name: str) -> Any:
    """CIFAR dict keys are str under latin1, bytes when a file was re-saved oddly."""
    if name in d:
        return d[name]
    if name.encode() in d:
        return d[name.encode()]
    raise UserInputError(f"CIFAR batch is missing the '{name}' entry (keys: {sorted(map(str, d))})")


def read_cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR python batches → images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    images, labels = [], []
    for f in files:
        entry = restricted_load(f)
        if not isinstance(entry, dict):
            raise UserInputError(f"'{f}' holds a {type(entry).__name__}, not a CIFAR batch dict")
        data = np.asarray(_key(entry, "data"), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserInputError(f"'{f}': 'data' has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(_key(entry, label_key), dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise UserInputError(f"'{f}': {len(images[-1])} images but {len(labels[-1])} labels")
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_cifar_meta(path: Path, key: str) -> list[str]:
    meta = restricted_load(path)
    names = _key(meta, key)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


STL10_SIDE = 96
STL10_PIXELS = 3 * STL10_SIDE * STL10_SIDE


def open_stl10_images(path: Path) -> np.ndarray:
    """STL-10 `*_X.bin` as a read-only memmap (N, 3, 96, 96) in file (column-major) order.

    The unlabeled file is 2.7 GB: it is mapped, never read whole.
    """
    size = path.stat().st_size
    if size == 0 or size % STL10_PIXELS:  # numpy cannot map an empty file either
        raise UserInputError(
            f"'{path}' is {size} bytes, not a multiple of one 96x96x3 image ({STL10_PIXELS}); "
            f"the file is truncated, re-extract stl10_binary"
        )
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size // STL10_PIXELS, 3, STL10_SIDE, STL10_SIDE))


def stl10_to_hwc(raw: np.ndarray) -> np.ndarray:
    """One STL-10 image as stored (3, 96, 96) column-major → (96, 96, 3) row-major."""
    return np.ascontiguousarray(np.asarray(raw).transpose(2, 1, 0))


def read_stl10_labels(path: Path) -> np.ndarray:
    """STL-10 labels are 1-based uint8 → 0-based int64."""
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size and y.min() < 1:
        raise UserInputError(f"'{path}' holds label 0; STL-10 labels are 1-based (1..10)")
    return y - 1
