"""Positive-pair modes: which image feeds which view (ARCHITECTURE.md, paper Fig. 8).

x is the real image, s and s' SASI of x, A(.) an augmentation draw, `plain` resize +
normalise. A SASI slot falls back to an augmented real view when its SASI is fishy (the
real image stands in for it) or missing (a second real view); both are counted, and
neither leaves a pair of two identical images.

Multi-crop (local crops > 0): the global crops follow the mode, local crop i comes from
x when i is even and from s when odd (from x only in `base`; in `mix` from the sample's
own source).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sasi_online.data.augment import PLAIN
from sasi_online.data.sasi_source import HIT, SasiHit
from sasi_online.errors import UserInputError

PAIR_MODES = ("base", "sasi", "sasi_real_aug", "sasi_no_aug", "three_flow", "synthetic_only",
              "mix", "direct")
NEEDS_SASI = frozenset(PAIR_MODES) - {"base"}


def check_pair_mode(mode: str, has_sasi: bool) -> None:
    """Refuse an unknown mode, or a SASI mode without a SASI source, before any work."""
    if mode not in PAIR_MODES:
        raise UserInputError(f"train.pair_mode '{mode}' is not one of {', '.join(PAIR_MODES)}")
    if mode in NEEDS_SASI and not has_sasi:
        raise UserInputError(
            f"train.pair_mode={mode} needs SASI but no store is configured: set store.path to a "
            f"SASI store (made by 'sasi generate'), or use train.pair_mode=base")


@dataclass
class PairBatch:
    views: list[torch.Tensor]  # one [B, 3, h, w] tensor per view
    origins: list[list[str]]  # origins[view][sample]: 'x', 's' or "s'" (which image fed it)
    outcomes: Counter = field(default_factory=Counter)  # SASI outcomes of this batch


def _global(i: int) -> str:
    return f"global{i}"


class PairBuilder:
    def __init__(self, mode: str, augmenter: Any, source: Any = None, num_global: int = 2,
                 num_local: int = 0):
        check_pair_mode(mode, source is not None)
        self.mode = mode
        self.augmenter = augmenter
        self.source = source
        n_specs = len(augmenter.recipe.global_views)
        self._kinds = [_global(i % n_specs) for i in range(max(num_global, 3))]
        self.num_global = num_global
        self.num_local = num_local

    @property
    def num_views(self) -> int:
        return (3 if self.mode == "three_flow" else self.num_global) + self.num_local

    # ------------------------------------------------------------------ planning
    def _plan(self, x, s: SasiHit, s2: Optional[SasiHit], coin: bool) -> list[tuple[str, str, Any]]:
        """(origin, view kind, image) for each view of one sample."""
        k = self._kinds

        def sasi_slot(hit: SasiHit, kind: str, origin: str):
            if hit is not None and hit.outcome == HIT:
                return (origin, kind, hit.image)
            return ("x", kind if kind != PLAIN else k[1], x)  # fishy / missing: an augmented real view

        m = self.mode
        if m == "base":
            views = [("x", k[0], x), ("x", k[1], x)]
        elif m == "sasi":
            views = [("x", k[0], x), sasi_slot(s, k[1], "s")]
        elif m == "sasi_real_aug":
            views = [("x", k[0], x), sasi_slot(s, PLAIN, "s")]
        elif m == "sasi_no_aug":
            views = [("x", PLAIN, x), sasi_slot(s, PLAIN, "s")]
        elif m == "three_flow":
            views = [("x", k[0], x), ("x", k[1], x), sasi_slot(s, k[2], "s")]
        elif m in ("synthetic_only", "direct"):
            first = sasi_slot(s, k[0], "s")
            if s2 is not None and s2.outcome == HIT:
                second = ("s'", k[1], s2.image)
            elif s is not None and s.outcome == HIT:  # one usable SASI: two draws of it
                second = ("s", k[1], s.image)
            else:
                second = ("x", k[1], x)
            views = [first, second]
        elif m == "mix":
            if coin and s is not None and s.outcome == HIT:
                views = [("s", k[0], s.image), ("s", k[1], s.image)]
            else:
                views = [("x", k[0], x), ("x", k[1], x)]
        else:  # pragma: no cover - check_pair_mode guards
            raise AssertionError(m)
        for i in range(self.num_local):
            if m == "mix":  # local crops follow the sample's own source
                origin, image = views[0][0], views[0][2]
                views.append((origin, "local", image))
            elif m == "base" or i % 2 == 0:
                views.append(("x", "local", x))
            else:
                views.append(sasi_slot(s, "local", "s"))
        return views

    # ------------------------------------------------------------------ building
    def sasi_rows(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Which samples of a batch of `n` take a SASI: every one in the SASI modes, none in
        `base`; in `mix` those whose coin says synthetic (drawn from `rng` here, once per
        batch). A caller that resolves SASI before `build` (the online ring) asks for these
        rows only and passes the same mask to `build`."""
        if self.mode == "mix":
            return rng.random(n) < 0.5
        return np.full(n, self.mode in NEEDS_SASI)

    def _fetch(self, indices: Sequence[int], rows: np.ndarray, rng: np.random.Generator) -> list:
        hits: list[Optional[SasiHit]] = [None] * len(indices)
        picked = np.flatnonzero(rows).tolist()
        if picked:
            for k, hit in zip(picked, self.source.get([int(indices[k]) for k in picked], rng)):
                hits[k] = hit
        return hits

    def build(self, real_images: Sequence[Any], indices: Sequence[int],
              rng: np.random.Generator, sasi_rows: Optional[np.ndarray] = None) -> PairBatch:
        """Views for one batch. `rng` drives SASI variant choice and the `mix` coin.

        SASI are fetched (and counted) only for the samples that use them (`sasi_rows`;
        drawn here when not given)."""
        n = len(indices)
        if len(real_images) != n:
            raise ValueError(f"{len(real_images)} images for {n} indices")
        ask = sasi_rows
        if sasi_rows is None:
            sasi_rows = self.sasi_rows(n, rng)
            # a two-phase source whose caller resolved every row (no mask given) answers them all
            ask = np.full(n, self.mode in NEEDS_SASI) if hasattr(self.source, "resolve") else sasi_rows
        outcomes: Counter = Counter()
        s_hits: list[Optional[SasiHit]] = [None] * n
        s2_hits: list[Optional[SasiHit]] = [None] * n
        if self.mode in NEEDS_SASI:
            s_hits = self._fetch(indices, ask, rng)
            outcomes.update(h.outcome for h in s_hits if h is not None)
            if self.mode in ("synthetic_only", "direct"):
                s2_hits = self._fetch(indices, ask, rng)
        coins = np.asarray(sasi_rows, bool) if self.mode == "mix" else np.zeros(n, bool)
        plans = [self._plan(real_images[i], s_hits[i], s2_hits[i], bool(coins[i])) for i in range(n)]
        views, origins = [], []
        for v in range(len(plans[0])):
            column = [p[v] for p in plans]
            views.append(self._augment_column(column))
            origins.append([c[0] for c in column])
        return PairBatch(views, origins, outcomes)

    def _augment_column(self, column: list[tuple[str, str, Any]]) -> torch.Tensor:
        """Augment one view position; samples may need different kinds (fallbacks)."""
        by_kind: dict[str, list[int]] = {}
        for i, (_, kind, _) in enumerate(column):
            by_kind.setdefault(kind, []).append(i)
        out: Optional[torch.Tensor] = None
        for kind, rows in by_kind.items():
            t = self.augmenter.apply(kind, [column[i][2] for i in rows])
            if out is None:
                out = torch.empty((len(column), *t.shape[1:]), dtype=t.dtype)
            if t.shape[1:] != out.shape[1:]:
                t = F.interpolate(t, size=out.shape[-2:], mode="bilinear", antialias=True,
                                  align_corners=False)
            out[rows] = t
        return out
