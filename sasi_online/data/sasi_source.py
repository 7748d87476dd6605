"""Where the trainer gets SASI from: the one hook between pairing and generation.

`SasiSource.get(indices, rng)` returns one `SasiHit` per image index. Offline training
reads a SASI store (`StoreSource`); an online ring source implements the same interface.
Outcomes are counted so the trainer can log hit rates:
  hit      a usable SASI was returned
  fishy    every variant of the image is flagged by the filter: the real image stands in
  missing  the image has no SASI at all: the pair falls back to a second real view
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

HIT, FISHY, MISSING = "hit", "fishy", "missing"
# outcomes that paired a sample with a SASI: the store's hit, and the online ring's own
# (online/ring_source.py: a ring hit, a pool draw, a store SASI behind the ring)
PAIRED = (HIT, "ring_hit", "pool_draw", "store")


def sasi_pair_rate(outcomes: dict) -> Optional[float]:
    """The fraction of samples that were paired with a SASI; None when none asked for one."""
    total = sum(int(v) for v in outcomes.values())
    return sum(int(outcomes.get(k, 0)) for k in PAIRED) / total if total else None
# SASI made from the caption alone (pure-noise start, no ControlNet)
CAPTION_ONLY_KINDS = ("noise", "direct")


@dataclass
class SasiHit:
    image: Any  # uint8 HWC np.ndarray | CHW uint8 tensor | None
    outcome: str  # hit | fishy | missing
    variant: Optional[int] = None


class SasiSource(Protocol):
    """`get` is asked only for the samples that use a SASI (`PairBuilder.sasi_rows`), so
    its counts are the batch's SASI uses. A two-phase source (one with `resolve`, like the
    online ring, whose caller resolves a batch before building it) is asked for every row
    unless that caller passes the rows it resolved to `PairBuilder.build(sasi_rows=...)`."""

    counts: Counter

    def get(self, indices: list[int], rng: np.random.Generator) -> list[SasiHit]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _variant_id(record: Any) -> int:
    if isinstance(record, int):
        return record
    if isinstance(record, dict):
        return int(record["variant"])
    return int(getattr(record, "variant"))


def _record_field(record: Any, name: str, default=None):
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


class _VariantSource:
    """Draws one usable variant per image at random and counts each outcome.

    Subclasses say which variants of an image are usable (`_usable_variants`) and load
    one (`_image`, None when it cannot be had)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def _usable_variants(self, index: int) -> tuple[list[int], int]:
        """(usable variant ids, number of variants before the fishy ones are dropped)."""
        raise NotImplementedError

    def _image(self, index: int, variant: int) -> Optional[np.ndarray]:
        raise NotImplementedError

    def get(self, indices: list[int], rng: np.random.Generator) -> list[SasiHit]:
        hits = []
        for index in indices:
            usable, total = self._usable_variants(int(index))
            if not usable:
                hit = SasiHit(None, FISHY if total else MISSING)
            else:
                variant = usable[int(rng.integers(len(usable)))]
                image = self._image(int(index), variant)
                hit = SasiHit(None, MISSING) if image is None else SasiHit(image, HIT, variant)
            self.counts[hit.outcome] += 1
            hits.append(hit)
        return hits

    def state_dict(self) -> dict:
        # SASI themselves live on disk or with the caller; only the counters belong to the run.
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state.get("counts", {}))


class StoreSource(_VariantSource):
    """A random non-fishy variant of each image from a SASI store.

    `vp_kind` restricts the variants (e.g. 'noise' for the `direct` pair mode, whose SASI
    come from the caption alone). The caption-only kinds ('noise' and 'direct', which
    `sasi generate --vp-kind direct` writes) stand for each other.
    """

    def __init__(self, store: Any, vp_kind: Optional[str] = None):
        super().__init__()
        self.store = store
        self.vp_kind = vp_kind
        self._kinds = None if vp_kind is None else (
            CAPTION_ONLY_KINDS if vp_kind in CAPTION_ONLY_KINDS else (vp_kind,))

    def _usable_variants(self, index: int) -> tuple[list[int], int]:
        if hasattr(self.store, "variant_table"):  # SasiStore: from its index, no manifest read
            rows = [r for r in self.store.variant_table(index) if not r[2]]  # (variant, kind, failed, fishy)
            if self._kinds is not None:
                rows = [r for r in rows if r[1] in self._kinds]
            return [r[0] for r in rows if not r[3]], len(rows)
        records = list(self.store.variants(index))
        if self._kinds is not None:
            records = [r for r in records if _record_field(r, "vp_kind", self.vp_kind) in self._kinds]
        ids = [_variant_id(r) for r in records]
        return [v for v in ids if not self.store.is_fishy(index, v)], len(ids)

    def _image(self, index: int, variant: int) -> Optional[np.ndarray]:
        image = self.store.get(index, variant)
        return None if image is None else np.asarray(image.convert("RGB"))


class ArraySource(_VariantSource):
    """SASI held in memory, {image index: [HWC uint8 arrays]} with optional fishy flags.

    For tests and small experiments; behaves like `StoreSource`.
    """

    def __init__(self, images: dict[int, list[np.ndarray]], fishy: Optional[set] = None):
        super().__init__()
        self.images = images
        self.fishy = fishy or set()

    def _usable_variants(self, index: int) -> tuple[list[int], int]:
        variants = self.images.get(index, [])
        return [v for v in range(len(variants)) if (index, v) not in self.fishy], len(variants)

    def _image(self, index: int, variant: int) -> Optional[np.ndarray]:
        return self.images[index][variant]
