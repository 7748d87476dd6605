"""DALI backend for augmentation recipes: one pipeline per view kind.

CPU operators run without a GPU (`device_id=None`); with a GPU the images move to the
device after the crop (`mixed` placement is for encoded input; ours is decoded pixels).
The external source is a callable with `batch_info=True` that hands over the batch set by
`apply` — the pipeline is run synchronously so the callable is consulted exactly once.

Random draws come from DALI's own generator seeded from (seed, view kind). A resumed run
restarts that stream: unlike the torchvision path, the steps after a resume see
different augmentations than the uninterrupted run (same distribution).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sasi_online.data.augment import PLAIN, Recipe, ViewSpec
from sasi_online.utils import derive_seed

try:  # optional: DALI is a large wheel
    from nvidia.dali import fn, pipeline_def, types

    _DALI_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _DALI_ERROR = exc


def _uniform(lo: float, hi: float):
    """A per-sample uniform draw in [lo, hi]; the constant when the range is empty (a recipe's
    0.0 jitter: DALI's random.uniform refuses end <= start)."""
    from nvidia.dali import fn

    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def dali_available() -> bool:
    return _DALI_ERROR is None


def _require_dali() -> None:
    if _DALI_ERROR is not None:
        from sasi_online.errors import UserInputError

        raise UserInputError(f"augment.backend=dali is unavailable because nvidia-dali cannot be "
                             f"imported ({_DALI_ERROR}); pip install nvidia-dali-cuda130 or use "
                             f"augment.backend=torchvision")


class _Feed:
    """The callable external source: returns whatever batch `apply` put there."""

    def __init__(self):
        self.batch: list[np.ndarray] = []

    def __call__(self, info):  # info: nvidia.dali.types.BatchInfo
        return self.batch


def _view_graph(images, spec: ViewSpec | None, side: int, image_size: int, mean, std, use_gpu: bool):
    """The operator graph of one view kind (DALI conditionals for the random choices)."""
    if use_gpu:
        images = images.gpu()
    if spec is None:
        images = fn.resize(images, resize_x=side, resize_y=side, antialias=True)
        mirror = 0
    else:
        images = fn.random_resized_crop(images, size=[side, side], random_area=list(spec.scale),
                                        random_aspect_ratio=list(spec.ratio), antialias=True)
        if spec.jitter_prob > 0 and fn.random.coin_flip(probability=spec.jitter_prob):
            images = fn.color_twist(
                images,
                brightness=_uniform(1 - spec.brightness, 1 + spec.brightness),
                contrast=_uniform(1 - spec.contrast, 1 + spec.contrast),
                saturation=_uniform(1 - spec.saturation, 1 + spec.saturation),
                hue=_uniform(-spec.hue * 360.0, spec.hue * 360.0),
            )
        if spec.grayscale > 0 and fn.random.coin_flip(probability=spec.grayscale):
            images = fn.hsv(images, saturation=0.0)
        if spec.blur_prob > 0 and fn.random.coin_flip(probability=spec.blur_prob):
            # The ViewSpec's blur rule, as torchvision and the device views: sigma in pixels of
            # this view's side (scaled from blur.sigma_at when the recipe gives one), the
            # kernel covering +-3 sigma of the largest sigma, capped at the side.
            lo, hi = spec.sigma_range(image_size)
            sigma = _uniform(lo, hi)
            images = fn.gaussian_blur(images, window_size=spec.blur_kernel(image_size), sigma=sigma)
        if spec.solarize > 0 and fn.random.coin_flip(probability=spec.solarize):
            f = fn.cast(images, dtype=types.FLOAT)
            keep = f < 128.0
            images = fn.cast(f * keep + (255.0 - f) * (1 - keep), dtype=types.UINT8)
        mirror = fn.random.coin_flip(probability=spec.flip)
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])


class DaliAugmenter:
    backend = "dali"

    def __init__(self, recipe: Recipe, image_size: int, seed: int = 0, max_batch: int = 256,
                 num_threads: int = 1):
        _require_dali()
        self.recipe = recipe
        self.image_size = image_size
        self.seed = seed
        self.max_batch = max_batch
        self.num_threads = num_threads
        self.use_gpu = torch.cuda.is_available()
        self._pipes: dict[str, tuple] = {}

    def _pipeline(self, kind: str):
        if kind in self._pipes:
            return self._pipes[kind]
        spec = self.recipe.spec(kind)
        side = self.image_size if spec is None else spec.side(self.image_size)
        feed = _Feed()
        recipe, image_size, use_gpu = self.recipe, self.image_size, self.use_gpu

        @pipeline_def(enable_conditionals=True)
        def view_pipeline():
            images = fn.external_source(source=feed, batch=True, batch_info=True, layout="HWC",
                                        dtype=types.UINT8)
            return _view_graph(images, spec, side, image_size, recipe.mean, recipe.std, use_gpu)

        pipe = view_pipeline(batch_size=self.max_batch, num_threads=self.num_threads,
                             device_id=torch.cuda.current_device() if use_gpu else None,
                             seed=derive_seed(self.seed, "dali", kind) % (2**31),
                             exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        pipe.build()
        self._pipes[kind] = (pipe, feed)
        return self._pipes[kind]

    def apply(self, kind: str, images: Sequence[np.ndarray]) -> torch.Tensor:
        pipe, feed = self._pipeline(kind)
        out = []
        for start in range(0, len(images), self.max_batch):
            chunk = [_hwc3(im) for im in images[start:start + self.max_batch]]
            feed.batch = chunk
            (result,) = pipe.run()
            if self.use_gpu:
                result = result.as_cpu()
            out.append(torch.from_numpy(np.stack([np.asarray(result[i]) for i in range(len(chunk))])))
        return torch.cat(out)


def _hwc3(image) -> np.ndarray:
    arr = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


__all__ = ["DaliAugmenter", "dali_available", "PLAIN"]
