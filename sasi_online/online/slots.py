"""What one ring slot holds: a SASI and its real image, both at the trainer's resolution.

A producer makes SASI at `generation.resolution` (512 px for the full-size models) but a
trainer's recipe crops views of `data.image_size` (e.g. 224 px). So each SASI is resized
once, on the producer, to the slot side (the largest view side x 8/7: 256 px for 224 px
crops, the 256 -> 224 convention of ImageNet recipes), and sent beside its real image at
that side (centre square, as the visual prompts use it). A slot is uint8 [2, S, S, 3]:
row SASI is the synthetic image, row REAL its real one, so a pool draw (which pairs a
SASI with its own real image) needs no host decode. At 256 px a pair takes 384 KiB, half
a 512 px SASI's 768 KiB: a ring of the same bytes holds 2x the pairs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SASI, REAL = 0, 1
CROP_MARGIN = 8 / 7  # 256 px sources for 224 px crops


def slot_side(cfg: Any) -> int:
    """Side of a ring slot for this config: `online.slot_side` if set, else the largest view
    side of the augment recipe at `data.image_size`, times 8/7, rounded up."""
    wanted = int(getattr(cfg.online, "slot_side", 0) or 0)
    if wanted < 0:
        from sasi_online.errors import UserInputError

        raise UserInputError(f"online.slot_side must be >= 0 (0: from the augment recipe), got {wanted}")
    if wanted > 0:
        return wanted
    from sasi_online.data.augment import load_recipe

    size = int(cfg.data.image_size)
    largest = size  # no recipe named yet (a bare Config): the image size
    if cfg.augment.recipe is not None:
        recipe = load_recipe(cfg.augment.recipe)
        views = [*recipe.global_views, *([recipe.local_view] if recipe.local_view else [])]
        largest = max([v.side(size) for v in views] + [size])
    return int(math.ceil(largest * CROP_MARGIN - 1e-9))


def slot_shape(cfg: Any) -> tuple[int, int, int, int]:
    s = slot_side(cfg)
    return (2, s, s, 3)


def _tensor(images: Any) -> torch.Tensor:
    if torch.is_tensor(images):
        return images
    arr = np.asarray(images)
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def resize_batch(images: Any, side: int) -> torch.Tensor:
    """uint8 [n, H, W, 3] (numpy or tensor, any device) -> uint8 [n, side, side, 3] on the
    same device: one antialiased bilinear resize for the batch."""
    x = _tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [n, H, W, 3] images, got {x.dtype} {tuple(x.shape)}")
    if tuple(x.shape[1:3]) == (side, side) or x.shape[0] == 0:
        return x if tuple(x.shape[1:3]) == (side, side) else x.new_zeros((0, side, side, 3))
    y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(side, side), mode="bilinear",
                      antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def real_at(image: Any, side: int) -> np.ndarray:
    """A real image (PIL or HxW(x3) array) -> uint8 [side, side, 3]: centre square, bicubic."""
    from PIL import Image

    from sasi_online.visual.prompts import prepare_image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(prepare_image(pil, side), np.uint8)


def make_slots(sasi: Any, reals: Sequence[Any], side: int, device: Any = None) -> torch.Tensor:
    """(SASI batch, their real images) -> uint8 [n, 2, side, side, 3] on `device` (default:
    the SASI's): the SASI batch is resized there in one call."""
    x = _tensor(sasi)
    s = resize_batch(x if device is None else x.to(device), side)
    if len(reals) != s.shape[0]:
        raise ValueError(f"{len(reals)} real images for {s.shape[0]} SASI")
    if not len(reals):
        return s.new_zeros((0, 2, side, side, 3))
    r = torch.from_numpy(np.stack([real_at(im, side) for im in reals])).to(s.device)
    return torch.stack([s, r], 1)
