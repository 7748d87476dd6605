"""One producer batch: real images → captions (cached) → rewrites → visual prompts → SASI.

The same stages as offline generation (`generation/offline.py`), one batch at a time, so
a producer can interleave them with its control work. Failures stay inside the batch:
an unreadable real image drops that item, a non-finite output (after the generator's own
retries) drops that SASI; both are counted. Whatever raises out of `make` (e.g. an
out-of-memory error) is the producer loop's to catch and skip.

On a CUDA generator the SASI stay on the device: they are resized into ring slots there,
their finiteness is read back once a batch (the generator's flags), and a host copy of the
full-resolution batch is made only when the store is written (`store.write_online`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from sasi_online.errors import CorruptImageError

log = logging.getLogger(__name__)


@dataclass
class MadeBatch:
    indices: list[int] = field(default_factory=list)
    variants: list[int] = field(default_factory=list)
    # n x H x W x 3 uint8, only finite SASI (what the store keeps); None when SASI stay on
    # the device and no store is written
    images: Optional[np.ndarray] = None
    slots: Any = None  # uint8 tensor [n, 2, S, S, 3] on the generator's device: each SASI and its real image
    captions: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    relpaths: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    failed: list[tuple[int, int]] = field(default_factory=list)  # (index, variant) without a SASI

    def __len__(self) -> int:
        return len(self.indices)


class SasiMaker:
    """Holds the models of one producer; `make([(index, variant), ...])` → MadeBatch."""

    def __init__(self, cfg: Any, dataset: Any, generator: Any = None, kind: Optional[str] = None,
                 on_device: Optional[bool] = None):
        from sasi_online.generation.generator import SASIGenerator
        from sasi_online.generation.text_stage import make_text_source

        self.cfg = cfg
        self.dataset = dataset
        self.kind = kind or cfg.visual.kind
        self.generator = generator or SASIGenerator.from_config(cfg.models, cfg.generation)
        self.text = make_text_source(cfg, dataset, device=str(self.generator.device))
        self.segmenter = None
        if self.kind in ("mask", "mix"):
            from sasi_online.visual.segmenter import Segmenter

            self.segmenter = Segmenter.from_config(cfg.models, cfg.visual, device=str(self.generator.device))
        self.counts: Counter = Counter()
        from .slots import slot_side

        self.slot_side = slot_side(cfg)  # what the trainers' rings hold (resized once, here)
        device = getattr(self.generator, "device", None)
        # None: keep SASI on the device when the generator runs on CUDA (a CPU keeps numpy)
        self.on_device = (device is not None and torch.device(device).type == "cuda") if on_device is None \
            else bool(on_device)
        self.store_images = bool(cfg.store.write_online and cfg.store.path)  # the store needs host copies

    @property
    def resolution(self) -> int:
        return int(self.cfg.generation.resolution)

    def make(self, items: Sequence[tuple[int, int]]) -> MadeBatch:
        from sasi_online.visual.prompts import build_visual_prompts
        from sasi_online.visual.variants import plan_variant

        cfg = self.cfg
        out = MadeBatch()
        kept, samples = [], []
        for index, variant in items:
            try:
                samples.append(self.dataset[int(index)])
                kept.append((int(index), int(variant)))
            except CorruptImageError as exc:  # a bad real image: skip it, keep the batch
                log.warning("producer: skipping unreadable image %d: %s", index, exc)
                out.failed.append((int(index), int(variant)))
                self.counts["bad_image"] += 1
        if not kept:
            return out
        sem_variants = cfg.semantics.variants
        plans = [plan_variant(i, v, semantic_variants=sem_variants, vp_variants=cfg.visual.variants,
                              augment=cfg.visual.augment, base_seed=cfg.generation.seed) for i, v in kept]
        captions = self.text.captions(samples)
        rewrites = self.text.rewrites(captions, samples, [p.rewrite_index for p in plans])
        if self.kind == "direct":
            vps = [None] * len(kept)
        else:
            vcfg = dataclasses.replace(cfg.visual, kind=self.kind)
            vps = build_visual_prompts([s.image for s in samples], [i for i, _ in kept], [v for _, v in kept],
                                       cfg=vcfg, resolution=self.resolution, base_seed=cfg.generation.seed,
                                       segmenter=self.segmenter, semantic_variants=sem_variants)
        seeds = [p.seed for p in plans]
        result = (self.generator.generate(rewrites, vps, seeds, on_device=True) if self.on_device
                  else self.generator.generate(rewrites, vps, seeds))
        well_formed = _is_uint8(result.images) and tuple(result.images.shape[1:]) == (self.resolution, self.resolution, 3)
        good = []
        for j, (index, variant) in enumerate(kept):
            if not (result.finite[j] and well_formed):
                out.failed.append((index, variant))
                self.counts["non_finite"] += 1
                continue
            good.append(j)
            out.indices.append(index)
            out.variants.append(variant)
            out.captions.append(captions[j])
            out.rewrites.append(rewrites[j])
            out.seeds.append(int(result.seeds[j]))
            out.relpaths.append(samples[j].relpath)
            out.retries.append(int(result.retries[j]))
        out.images, out.slots = self._outputs(result.images, good, [samples[j].image for j in good])
        self.counts["made"] += len(good)
        return out

    def _outputs(self, images: Any, good: list[int], reals: list) -> tuple[Optional[np.ndarray], Any]:
        """(the store's full-resolution numpy batch, the ring slots) of the finite SASI."""
        from .slots import make_slots

        res = self.resolution
        if not self.on_device:
            host = images[good] if good else np.zeros((0, res, res, 3), np.uint8)
            return host, make_slots(host, reals, self.slot_side, device=getattr(self.generator, "device", None))
        sasi = images[good] if good else images.new_zeros((0, res, res, 3))
        host = sasi.cpu().numpy() if self.store_images else None  # one copy of the batch, for the store
        return host, make_slots(sasi, reals, self.slot_side)


def _is_uint8(images: Any) -> bool:
    return images.dtype == (torch.uint8 if torch.is_tensor(images) else np.uint8)
