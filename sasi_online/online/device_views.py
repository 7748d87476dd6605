"""Online micro-batches with the work split where it belongs (augment.backend=torchvision).

- DataLoader workers (`RealViews`, train.num_workers of them, pinned on CUDA): decode the
  planned real images of micro-step m and augment every real view a sample may need (the
  plan of a sample without SASI), left as uint8. They never touch the ring, so they run
  ahead of the step like offline loading.
- The trainer process (`DeviceViewBatches`): pair from the ring (RingSource.resolve: O(batch)
  metadata on the host), then turn every view whose image is a ring slot (a hit's or a
  draw's SASI, and a draw's real image, which its slot holds) into augmented, normalised
  views on the trainer's device: one `augment_views` call per view side (one per step
  unless multi-crop), the Triton kernel on a GPU, its torch reference on a CPU. Worker
  views are normalised on the device; a store SASI (a ring miss) is augmented on the host.
Nothing here reads a device tensor back to the host: the step has no host sync.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sasi_online.data.augment import normalize_on_device
from sasi_online.data.pairs import PairBatch
from sasi_online.utils import derive_seed

from .ring import to_device_index

_X = object()  # the plan's stand-in for "this sample's real image"


@dataclass
class _Job:  # one view of one sample made on the device from a ring slot
    view: int
    row: int
    kind: str
    image: torch.Tensor  # uint8 [S, S, 3] on the ring's device


class RealViews:
    """Worker side: micro-step m -> uint8 real views of its planned images (picklable)."""

    def __init__(self, dataset: Any, sampler: Any, builder: Any, seed: int, trainer_rank: int):
        import copy

        self.builder = copy.copy(builder)
        self.builder.source = None  # workers never see the ring (nor pickle its device memory)
        self.dataset, self.sampler = dataset, sampler
        self.seed, self.rank = seed, trainer_rank

    def __call__(self, m: int) -> PairBatch:
        indices = self.sampler.indices(m, self.rank)
        images = [np.asarray(self.dataset[i].image) for i in indices]
        kinds = [kind for _, kind, _ in self.builder._plan(_X, None, None, False)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.rank, m, "augment"))
            views = [self.builder.augmenter.apply_uint8(kind, images) for kind in kinds]
        return PairBatch(views, [["x"] * len(indices) for _ in kinds])


def _params_for(spec: Any, recipe: Any, image_size: int, n: int, hw: tuple[int, int], gen: torch.Generator):
    from sasi_online.kernels.ring_augment import AugParams, AugRecipe, sample_aug_params

    if spec is None:  # plain: the whole image, resized and normalised
        z = torch.zeros(n)
        crop = torch.tensor([[0, 0, hw[0], hw[1]]], dtype=torch.int64).repeat(n, 1)
        return AugParams(crop, torch.zeros(n, dtype=torch.bool), z + 1, z + 1, z + 1, z.clone(),
                         torch.zeros(n, dtype=torch.bool))
    return sample_aug_params(n, hw, AugRecipe.from_view_spec(spec, recipe.mean, recipe.std, image_size), gen)


def _cat_params(parts: list) -> Any:
    """One AugParams for views of several kinds (same output side: same blur kernel)."""
    from sasi_online.kernels.ring_augment import AugParams

    if len(parts) == 1:
        return parts[0]
    n = [len(p) for p in parts]
    cat = {k: torch.cat([getattr(p, k) for p in parts])
           for k in ("crop", "flip", "brightness", "contrast", "saturation", "hue", "gray")}
    blur = solar = None
    if any(p.blur_sigma is not None for p in parts):
        blur = torch.cat([p.blur_sigma if p.blur_sigma is not None else torch.zeros(k) for p, k in zip(parts, n)])
    if any(p.solarize is not None for p in parts):
        solar = torch.cat([p.solarize if p.solarize is not None else torch.zeros(k, dtype=torch.bool)
                           for p, k in zip(parts, n)])
    kernel = max(p.blur_kernel for p in parts)
    return AugParams(**cat, blur_sigma=blur, solarize=solar, blur_kernel=kernel)


class DeviceViewBatches:
    """Trainer side: (micro-step m, its worker views) -> views on `device`, ring SASI augmented there."""

    def __init__(self, sampler: Any, builder: Any, source: Any, seed: int, trainer_rank: int,
                 device: torch.device, image_size: int):
        self.sampler, self.builder, self.source = sampler, builder, source
        self.seed, self.rank, self.device, self.image_size = seed, trainer_rank, device, image_size
        self.recipe = builder.augmenter.recipe
        self.calls = 0  # augment_views calls so far (one per view side per step)

    def __call__(self, m: int, worker_views: list[torch.Tensor]) -> tuple[list[torch.Tensor], Counter]:
        indices = self.sampler.indices(m, self.rank)
        rng = np.random.default_rng(derive_seed(self.seed, self.rank, m, "pairs"))
        rows = self.builder.sasi_rows(len(indices), rng)
        _, hits = self.source.resolve(indices, rng, rows)  # pool draws' real images: source.real_images
        outcomes = Counter(h.outcome for h in hits if h is not None)
        views = [normalize_on_device(v, self.recipe, self.device) for v in worker_views]
        jobs, host = self._plan(hits, rows)
        self._device_views(views, jobs, m)
        self._host_views(views, host)
        return views, outcomes

    def _plan(self, hits: list, rows: np.ndarray) -> tuple[list[_Job], list[tuple[int, int, str, Any]]]:
        """Which (view, sample) the device makes from a slot, which the host makes from a store SASI."""
        jobs, host = [], []
        coins = np.asarray(rows, bool) if self.builder.mode == "mix" else np.zeros(len(hits), bool)
        for r, hit in enumerate(hits):
            drawn = self.source.real_images[r] if self.source.real_images else None
            if hit is None and drawn is None:
                continue  # a real-only sample: the worker's views stand
            s2 = hit if self.builder.mode in ("synthetic_only", "direct") else None
            for v, (origin, kind, image) in enumerate(self.builder._plan(_X, hit, s2, bool(coins[r]))):
                if image is _X:
                    if drawn is not None:  # a pool draw: its real image is the slot's
                        jobs.append(_Job(v, r, kind, drawn))
                elif torch.is_tensor(image) and image.device == self.source.ring.images.device:
                    jobs.append(_Job(v, r, kind, image))
                else:
                    host.append((v, r, kind, image))
        return jobs, host

    def _side(self, kind: str) -> int:
        spec = self.recipe.spec(kind)
        return self.image_size if spec is None else spec.side(self.image_size)

    def _device_views(self, views: list[torch.Tensor], jobs: list[_Job], m: int) -> None:
        from sasi_online.kernels.dispatch import augment_views

        if not jobs:
            return
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, m, "device_augment"))
        hw = tuple(jobs[0].image.shape[:2])
        by_side: dict[int, list[_Job]] = {}
        for j in jobs:
            by_side.setdefault(self._side(j.kind), []).append(j)
        for side, group in by_side.items():
            kinds = sorted({j.kind for j in group})
            order = [j for k in kinds for j in group if j.kind == k]
            params = _cat_params([_params_for(self.recipe.spec(k), self.recipe, self.image_size,
                                              sum(j.kind == k for j in group), hw, gen) for k in kinds])
            images = torch.stack([j.image for j in order])
            out = augment_views(images, params, side, mean=self.recipe.mean, std=self.recipe.std,
                                channels_last=True)
            self.calls += 1
            self._scatter(views, order, out)

    @staticmethod
    def _scatter(views: list[torch.Tensor], jobs: list, out: torch.Tensor) -> None:
        for v in sorted({j.view for j in jobs}):
            sel = [k for k, j in enumerate(jobs) if j.view == v]
            block = out.index_select(0, to_device_index(sel, out.device))
            if block.shape[-2:] != views[v].shape[-2:]:
                block = F.interpolate(block, size=views[v].shape[-2:], mode="bilinear", antialias=True,
                                      align_corners=False)
            rows = to_device_index([jobs[k].row for k in sel], views[v].device)
            views[v].index_copy_(0, rows, block.to(views[v].dtype))

    def _host_views(self, views: list[torch.Tensor], host: list[tuple[int, int, str, Any]]) -> None:
        """Store SASI (the ring missed): augmented on the host as uint8, normalised on the device."""
        if not host:
            return
        jobs = [_Job(v, r, kind, None) for v, r, kind, _ in host]
        for kind in sorted({j.kind for j in jobs}):
            sel = [k for k, j in enumerate(jobs) if j.kind == kind]
            out = normalize_on_device(self.builder.augmenter.apply_uint8(kind, [host[k][3] for k in sel]),
                                      self.recipe, self.device)
            self._scatter(views, [jobs[k] for k in sel], out)
