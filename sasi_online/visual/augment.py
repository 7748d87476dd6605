"""VP augmentation (paper, Generation stage): Gaussian noise on, or a random crop of,
the visual prompt — a new prompt, hence a new SASI, from the same real image.

Init and control images of one VP are changed together: the same noise field, the
same crop box, so a mix VP's blend still lies on its mask map. The randomness comes
from the VP's own seed, so a (image index, variant) always gets the same prompt.
Mask maps are resized nearest-neighbour after a crop (palette colours only); Gaussian
noise on a mask map is the paper's augmentation and deliberately leaves the palette.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
from PIL import Image

from sasi_online.errors import UserInputError
from sasi_online.utils import derive_seed
from sasi_online.visual.prompts import VisualPrompt


def augment_rng(seed: int) -> np.random.Generator:
    """The augmentation's own stream, apart from the generator's use of the same seed."""
    return np.random.default_rng(derive_seed("vp-augment", int(seed)))


def crop_box(size: tuple[int, int], scale: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box whose sides are `scale` of the image's."""
    w, h = size
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return left, top, left + cw, top + ch


def _noised(image: Optional[Image.Image], noise: np.ndarray) -> Optional[Image.Image]:
    if image is None:
        return None
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 + noise
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _cropped(image: Optional[Image.Image], box, resample: int) -> Optional[Image.Image]:
    if image is None:
        return None
    return image.resize(image.size, resample, box=box)


def augment_visual_prompt(vp: VisualPrompt, mode: str, *, noise_std: float = 0.1,
                          crop_scale: float = 0.7) -> VisualPrompt:
    """`vp` with Gaussian noise (std in [0, 1] image units) or a random crop resized back.

    A noise VP (no images) is returned as it is: its randomness is its seed alone.
    """
    images = [im for im in (vp.init_image, vp.control_image) if im is not None]
    if mode == "none" or not images:
        return vp
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise UserInputError(f"init and control images of a visual prompt differ in size ({sizes}); "
                             f"build them with make_visual_prompt at one resolution")
    (w, h), = sizes
    rng = augment_rng(vp.seed)
    if mode == "noise":
        noise = rng.normal(0.0, noise_std, size=(h, w, 3)).astype(np.float32)
        return replace(vp, init_image=_noised(vp.init_image, noise),
                       control_image=_noised(vp.control_image, noise), augment="noise")
    if mode == "crop":
        box = crop_box((w, h), crop_scale, rng)
        return replace(vp, init_image=_cropped(vp.init_image, box, Image.Resampling.BICUBIC),
                       control_image=_cropped(vp.control_image, box, Image.Resampling.NEAREST),
                       augment="crop")
    raise UserInputError(f"visual.augment='{mode}' is not known; use none, noise or crop")
