"""The ring: a bounded replay pool of SASI on a trainer's device.

Production is 100-500x slower than consumption, so this is a replay pool, not a FIFO:
an entry is reused up to `max_reuse` times and for at most `max_age` trainer steps.

Rules (ARCHITECTURE.md, "Ring"):
- fixed slots of uint8 images, each with (image index, variant, birth step, use count);
  the memory is allocated once at start (slots x bytes per slot);
- a new SASI takes a free slot, else the slot of an entry past its reuse or age limit,
  else the slot of the oldest entry that has been used at least once;
- if every slot holds an unused entry inside its age limit the producer must wait
  (`put` returns False: backpressure), so nothing generated is thrown away unseen;
- the trainer never waits: `lookup` finds SASI for the indices of its real batch
  (look-ahead turns these into hits), `draw` takes a random live entry otherwise.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

EMPTY = -1


@dataclass
class RingHit:
    slot: int
    image_index: int
    variant: int
    age: int  # trainer steps since the SASI arrived
    uses: int  # uses including this one


class RingPool:
    def __init__(self, slots: int, image_shape: tuple[int, int, int], device: str | torch.device = "cpu",
                 max_reuse: int = 8, max_age: int = 2000):
        if slots < 1:
            raise ValueError(f"online.ring_slots must be >= 1, got {slots}")
        if max_reuse < 1 or max_age < 1:
            raise ValueError("online.max_reuse and online.max_age must be >= 1")
        self.slots = slots
        self.image_shape = tuple(image_shape)
        self.max_reuse = max_reuse
        self.max_age = max_age
        self.images = torch.zeros((slots, *self.image_shape), dtype=torch.uint8, device=device)
        # Per-slot metadata lives on the host: it is tiny and read every step.
        self.index = np.full(slots, EMPTY, dtype=np.int64)
        self.variant = np.full(slots, EMPTY, dtype=np.int64)
        self.birth = np.zeros(slots, dtype=np.int64)
        self.uses = np.zeros(slots, dtype=np.int64)
        self.counts: Counter = Counter()  # accepted, rejected, evicted_*, hit, draw ...
        self.age_at_use: list[int] = []  # recent ages at use, for the age distribution
        self.uses_at_eviction: list[int] = []  # reuse distribution

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_slot(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def nbytes(self) -> int:
        return self.slots * self.bytes_per_slot

    def fill(self) -> float:
        return float((self.index != EMPTY).mean())

    # ------------------------------------------------------------------ liveness
    def _expired(self, step: int) -> np.ndarray:
        occupied = self.index != EMPTY
        return occupied & ((self.uses >= self.max_reuse) | (step - self.birth > self.max_age))

    def _live(self, step: int) -> np.ndarray:
        return (self.index != EMPTY) & ~self._expired(step)

    def _victim(self, step: int) -> Optional[int]:
        free = np.flatnonzero(self.index == EMPTY)
        if free.size:
            return int(free[0])
        expired = np.flatnonzero(self._expired(step))
        if expired.size:
            return int(expired[np.argmin(self.birth[expired])])
        used = np.flatnonzero(self.uses > 0)
        if used.size:
            return int(used[np.argmin(self.birth[used])])
        return None

    def can_accept(self, step: int) -> bool:
        return self._victim(step) is not None

    # ------------------------------------------------------------------ producer side
    def put(self, image_index: int, variant: int, image: torch.Tensor, step: int) -> bool:
        """Store one SASI (uint8, `image_shape`). False means: full of unused live entries, wait."""
        if tuple(image.shape) != self.image_shape or image.dtype != torch.uint8:
            raise ValueError(f"ring slot expects uint8 {self.image_shape}, got {image.dtype} {tuple(image.shape)}")
        slot = self._victim(step)
        if slot is None:
            self.counts["rejected"] += 1
            return False
        if self.index[slot] != EMPTY:
            reason = "expired" if self._expired(step)[slot] else "oldest_used"
            self.counts[f"evicted_{reason}"] += 1
            if self.uses[slot] == 0:
                self.counts["evicted_unused"] += 1
            self.uses_at_eviction.append(int(self.uses[slot]))
        self.images[slot].copy_(image, non_blocking=True)
        self.index[slot] = image_index
        self.variant[slot] = variant
        self.birth[slot] = step
        self.uses[slot] = 0
        self.counts["accepted"] += 1
        return True

    # ------------------------------------------------------------------ trainer side
    def _use(self, slot: int, step: int) -> RingHit:
        self.uses[slot] += 1
        age = int(step - self.birth[slot])
        self.age_at_use.append(age)
        if len(self.age_at_use) > 10000:
            del self.age_at_use[:5000]
        return RingHit(slot, int(self.index[slot]), int(self.variant[slot]), age, int(self.uses[slot]))

    def lookup(self, indices: list[int], step: int, rng: np.random.Generator) -> list[Optional[RingHit]]:
        """A live SASI for each image index of the batch, or None; the least-used variant wins."""
        live = self._live(step)
        by_index: dict[int, list[int]] = {}
        for slot in np.flatnonzero(live):
            by_index.setdefault(int(self.index[slot]), []).append(int(slot))
        hits: list[Optional[RingHit]] = []
        for idx in indices:
            slots = by_index.get(int(idx))
            if not slots:
                hits.append(None)
                continue
            least = min(self.uses[s] for s in slots)
            choices = [s for s in slots if self.uses[s] == least]
            slot = int(choices[rng.integers(len(choices))])
            hits.append(self._use(slot, step))
            if self.uses[slot] >= self.max_reuse:
                slots.remove(slot)
        self.counts["hit"] += sum(h is not None for h in hits)
        return hits

    def draw(self, n: int, step: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[RingHit]:
        """Up to `n` random live entries (distinct slots), fewest uses first."""
        live = np.flatnonzero(self._live(step))
        live = np.array([s for s in live if int(self.index[s]) not in exclude], dtype=np.int64)
        if live.size == 0:
            return []
        order = live[rng.permutation(live.size)]
        order = order[np.argsort(self.uses[order], kind="stable")][:n]
        out = [self._use(int(s), step) for s in order]
        self.counts["draw"] += len(out)
        return out

    def image(self, slot: int) -> torch.Tensor:
        return self.images[slot]

    # ------------------------------------------------------------------ metrics and state
    def stats(self, step: int) -> dict:
        occupied = self.index != EMPTY
        ages = step - self.birth[occupied]
        return {
            "ring/fill": self.fill(),
            "ring/live": float(self._live(step).mean()),
            "ring/age_mean": float(ages.mean()) if ages.size else 0.0,
            "ring/uses_mean": float(self.uses[occupied].mean()) if occupied.any() else 0.0,
            **{f"ring/{k}": float(v) for k, v in self.counts.items()},
        }

    def state_dict(self) -> dict:
        return {
            "images": self.images.cpu(),
            "index": torch.from_numpy(self.index.copy()),
            "variant": torch.from_numpy(self.variant.copy()),
            "birth": torch.from_numpy(self.birth.copy()),
            "uses": torch.from_numpy(self.uses.copy()),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["images"].shape) != (self.slots, *self.image_shape):
            raise ValueError(
                f"checkpointed ring has shape {tuple(state['images'].shape)}, this run's ring is "
                f"{(self.slots, *self.image_shape)}: resume with the same online.ring_slots and image size"
            )
        self.images.copy_(state["images"])
        self.index = state["index"].numpy().copy()
        self.variant = state["variant"].numpy().copy()
        self.birth = state["birth"].numpy().copy()
        self.uses = state["uses"].numpy().copy()
        self.counts = Counter(state["counts"])
