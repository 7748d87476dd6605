"""Fashion-MNIST's native idx files (as `dataset-fashion-mnist` installs them), the labels
the micro set learns from them (foreground masks, shades) and the shared image preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sasi_online.data.idx import DEFAULT_DATA, load_split  # noqa: F401  (the micro set trains from it)

# pixels above this are garment when the segmenter and the ControlNets learn (the
# segmenter's quality test draws its ground truth at a different threshold)
FOREGROUND_THRESHOLD = 20


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
