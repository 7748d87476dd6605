"""One producer batch: real images → captions (cached) → rewrites → visual prompts → SASI.

The same stages as offline generation (`generation/offline.py`), one batch at a time, so
a producer can interleave them with its control work. Failures stay inside the batch:
an unreadable real image drops that item, a non-finite output (after the generator's own
retries) drops that SASI; both are counted. Whatever raises out of `make` (e.g. an
out-of-memory error) is the producer loop's to catch and skip.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from sasi_online.errors import CorruptImageError

log = logging.getLogger(__name__)


@dataclass
class MadeBatch:
    indices: list[int] = field(default_factory=list)
    variants: list[int] = field(default_factory=list)
    images: Optional[np.ndarray] = None  # n x H x W x 3 uint8, only finite SASI (what the store keeps)
    slots: Any = None  # uint8 tensor [n, 2, S, S, 3]: each SASI and its real image at the ring's side
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

    def __init__(self, cfg: Any, dataset: Any, generator: Any = None, kind: Optional[str] = None):
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

    @property
    def resolution(self) -> int:
        return int(self.cfg.generation.resolution)

    def make(self, items: Sequence[tuple[int, int]]) -> MadeBatch:
        from sasi_online.visual.prompts import build_visual_prompts
        from sasi_online.visual.variants import plan_variant

        from .slots import make_slots

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
        result = self.generator.generate(rewrites, vps, [p.seed for p in plans])
        good = []
        for j, (index, variant) in enumerate(kept):
            image = result.images[j]
            if not result.finite[j] or image.dtype != np.uint8 or image.shape != (self.resolution, self.resolution, 3):
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
        out.images = result.images[good] if good else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        out.slots = make_slots(out.images, [samples[j].image for j in good], self.slot_side,
                               device=getattr(self.generator, "device", None))
        self.counts["made"] += len(good)
        return out
