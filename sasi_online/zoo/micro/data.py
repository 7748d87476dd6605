"""Fashion-MNIST's native idx files (as `dataset-fashion-mnist` installs them), the labels
the micro set learns from them (foreground masks, shades) and the shared image preprocessing."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from sasi_online.errors import UserInputError

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_INSTALL = ("install it with `apt-get install dataset-fashion-mnist` (files under "
            f"{DEFAULT_DATA}) or pass --data with the folder holding the idx files")

# pixels above this are garment when the segmenter and the ControlNets learn (the
# segmenter's quality test draws its ground truth at a different threshold)
FOREGROUND_THRESHOLD = 20


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


def embedded_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The package's embedded subset (2,000 train / 500 test images)."""
    path = Path(__file__).resolve().parents[2] / "assets" / "fashion_mnist" / "subset.npz"
    with np.load(path) as data:
        return data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)


def foreground(images: np.ndarray, threshold: int = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Boolean garment masks (the background of Fashion-MNIST is black)."""
    return np.asarray(images) > threshold


def shades(images: np.ndarray) -> np.ndarray:
    """Shade index per image (0 dark, 1 grey, 2 white/light), as tiny_captions.tone_of says."""
    from sasi_online.semantics.tiny_captions import TONES, tone_of

    return np.array([TONES.index(tone_of(im)) for im in images], dtype=np.int64)


def resize_grey(images: np.ndarray, size: int, resample: str = "bicubic", chunk: int = 4096):
    """(N, 1, size, size) uint8 tensor: grey uint8 images resized as an image processor does
    (rounded back to uint8, as PIL does), in chunks so the whole set never exists as floats."""
    import torch
    import torch.nn.functional as F

    src = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
    out = torch.empty((len(src), 1, size, size), dtype=torch.uint8)
    for s in range(0, len(src), chunk):
        x = src[s:s + chunk].float().unsqueeze(1)
        x = F.interpolate(x, size=(size, size), mode=resample, align_corners=False)
        out[s:s + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def normalize(grey_u8, mean, std):
    """(B, 3, H, W) float32 model input from (B, 1, H, W) uint8: scaled to [0, 1], normalised."""
    import torch

    x = grey_u8.float().div_(255.0).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
