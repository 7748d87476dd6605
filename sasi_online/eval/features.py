"""Frozen features of clean images: resize + centre crop + normalise, no augmentation.

Batched, no grad, the model in eval mode (BatchNorm uses its running statistics), a
progress bar. Works with any IndexedDataset (`ds[i]` -> sample with `.image` PIL RGB and
`.label`) and any encoder: a method's `encode(x)` when it has one, else `model(x)`.
Features can be cached on disk (safetensors, keyed by a fingerprint) so a re-run of
`sasi eval` resumes without re-encoding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from sasi_online.errors import CorruptImageError
from sasi_online.utils import atomic_write_bytes


@dataclass
class Features:
    feats: torch.Tensor  # [N, D] float32, on the CPU
    labels: torch.Tensor  # [N] int64
    indices: torch.Tensor  # [N] dataset indices (corrupt images are skipped, so not always arange)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_ratio: float = 1.0) -> Callable:
    """PIL → normalised CHW float tensor: shorter side to image_size / crop_ratio, centre crop.

    crop_ratio 1.0 (small images: resize straight to the training size) or 0.875
    (ImageNet: 256 → 224).
    """
    from torchvision.transforms import v2

    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"eval.crop_ratio must be in (0, 1], got {crop_ratio}")
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(round(image_size / crop_ratio)), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class _Clean(Dataset):
    """Applies the eval transform; a corrupt image becomes None (skipped, with a warning)."""

    def __init__(self, ds, transform: Callable):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            sample = self.ds[i]
        except CorruptImageError as exc:
            warnings.warn(f"skipping a corrupt image in evaluation: {exc}", stacklevel=2)
            return None
        return self.transform(sample.image.convert("RGB")), int(sample.label), i


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images, labels, idx = zip(*batch)
    return torch.stack(images), torch.tensor(labels), torch.tensor(idx)


def encoder_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A method's backbone features (`encode`) or the module's own output, flattened."""
    fn = getattr(model, "encode", None) or model
    return lambda x: fn(x).flatten(1)


@torch.no_grad()
def extract_features(model: torch.nn.Module, ds, image_size: int, mean: Sequence[float],
                     std: Sequence[float], batch_size: int = 256, crop_ratio: float = 1.0,
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     desc: str = "features") -> Features:
    from tqdm.auto import tqdm

    loader = DataLoader(_Clean(ds, eval_transform(image_size, mean, std, crop_ratio)),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    was_training = model.training
    model.eval()
    encode = encoder_fn(model)
    feats, labels, indices = [], [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            if batch is None:
                continue
            x, y, i = batch
            feats.append(encode(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
            indices.append(i)
    finally:
        model.train(was_training)
    if not feats:
        raise CorruptImageError(f"no readable image in the {desc} dataset ({len(ds)} entries)")
    return Features(torch.cat(feats), torch.cat(labels).long(), torch.cat(indices).long())


def save_features(path: str | Path, features: Features, fingerprint: str) -> None:
    from safetensors.torch import save

    data = save({"feats": features.feats.contiguous(), "labels": features.labels.contiguous(),
                 "indices": features.indices.contiguous()}, metadata={"fingerprint": fingerprint})
    atomic_write_bytes(path, data)


def load_features(path: str | Path, fingerprint: str) -> Features | None:
    """Cached features if the file exists, reads, and was made with the same fingerprint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return Features(fh.get_tensor("feats"), fh.get_tensor("labels"), fh.get_tensor("indices"))
    except Exception:  # a truncated or foreign cache file is recomputed, never trusted
        return None
