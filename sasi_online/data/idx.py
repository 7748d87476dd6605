"""Fashion-MNIST's native idx files, as the Debian package `dataset-fashion-mnist` installs
them (60,000 train and 10,000 test images, gzip-compressed or not)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from sasi_online.errors import UserInputError

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_INSTALL = ("install it with `apt-get install dataset-fashion-mnist` (files under "
            f"{DEFAULT_DATA}), or point data.root (`sasi zoo build --data`) at the folder holding the idx files")

def _open(folder: Path, stem: str) -> bytes:
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                return f.read()
    raise UserInputError(f"'{folder}' has no {stem}(.gz): {_INSTALL}")


def _parse(raw: bytes, magic: int, what: str) -> np.ndarray:
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise UserInputError(f"{what} is not an idx file (bad magic number): {_INSTALL}")
    n = int.from_bytes(raw[4:8], "big")
    shape = (n, 28, 28) if magic == 2051 else (n,)
    header = 16 if magic == 2051 else 8
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise UserInputError(f"{what} is truncated ({body.size} bytes for {n} items): {_INSTALL}")
    return body.reshape(shape)


def load_split(folder: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N int64) of Fashion-MNIST's `split` in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"Fashion-MNIST folder '{folder}' does not exist: {_INSTALL}")
    img_stem, lab_stem = _FILES[split]
    images = _parse(_open(folder, img_stem), 2051, f"{folder}/{img_stem}")
    labels = _parse(_open(folder, lab_stem), 2049, f"{folder}/{lab_stem}").astype(np.int64)
    if len(images) != len(labels):
        raise UserInputError(f"'{folder}': {len(images)} images but {len(labels)} labels: {_INSTALL}")
    return images, labels
