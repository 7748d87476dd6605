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

Every operation costs O(batch), not O(slots): the metadata is indexed three ways.
- image index -> its slots: a dataset-sized table of chain heads plus per-slot links
  (`lookup` and `draw`'s exclusions walk the chains of the batch's images only);
- use count -> live slots: one unordered array per count with a position map
  (`draw` samples the least-used level directly; moving a slot up is O(1));
- birth order: heaps of (birth, slot) for aging entries out and picking victims,
  with stale items dropped lazily when their slot has been reused.
Steps are the trainer's micro-steps and never go backwards; an entry that passes its
age limit at some step stays expired.

Checkpoints hold metadata and counters only, never the pixels (`state_dict`): a resumed
ring starts empty, counts what it lost as `dropped_at_resume`, and refills from the
producers and, through `refill`, from a store that holds those SASI.
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

EMPTY = -1
STATE_VERSION = 2  # 1: the whole ring with its images; 2: metadata and counters only
_AGE_HISTORY = 10000


@dataclass
class RingHit:
    slot: int
    image_index: int
    variant: int
    age: int  # trainer steps since the SASI arrived
    uses: int  # uses including this one


class _Levels:
    """Live slots bucketed by use count: level u holds the live entries used u times.

    Each level is an unordered array plus a position map, so adding or removing k slots
    and sampling k members are O(k) array operations."""

    def __init__(self, levels: int, slots: int):
        self.slots = slots
        self.members = [np.empty(min(slots, 1024), np.int64) for _ in range(levels)]
        self.size = np.zeros(levels, np.int64)
        self.level = np.full(slots, EMPTY, np.int64)  # each slot's level; EMPTY: not live
        self.pos = np.zeros(slots, np.int64)

    def _room(self, u: int, extra: int) -> np.ndarray:
        arr, m = self.members[u], int(self.size[u])
        if m + extra > arr.size:
            grown = np.empty(min(self.slots, max(2 * arr.size, m + extra)), np.int64)
            grown[:m] = arr[:m]
            self.members[u] = arr = grown
        return arr

    def add_one(self, slot: int, u: int) -> None:
        arr, m = self._room(u, 1), int(self.size[u])
        arr[m] = slot
        self.pos[slot], self.level[slot], self.size[u] = m, u, m + 1

    def remove_one(self, slot: int) -> None:
        u = int(self.level[slot])
        if u == EMPTY:
            return
        arr, m, p = self.members[u], int(self.size[u]) - 1, int(self.pos[slot])
        last = int(arr[m])
        arr[p] = last
        self.pos[last], self.size[u], self.level[slot] = p, m, EMPTY

    def add(self, slots: np.ndarray, u: int) -> None:
        k = slots.size
        arr, m = self._room(u, k), int(self.size[u])
        arr[m:m + k] = slots
        self.pos[slots] = np.arange(m, m + k)
        self.level[slots] = u
        self.size[u] = m + k

    def remove(self, slots: np.ndarray) -> None:
        """Take live `slots` (distinct, any levels) out of their levels."""
        lv = self.level[slots]
        for u in np.unique(lv):
            if u != EMPTY:
                self._remove_from(slots[lv == u], int(u))
        self.level[slots] = EMPTY

    def _remove_from(self, gone: np.ndarray, u: int) -> None:
        # Members of the last k positions that stay fill the holes the others leave.
        arr, m, k = self.members[u], int(self.size[u]), gone.size
        keep_m = m - k
        p = self.pos[gone]
        holes = p[p < keep_m]
        in_tail = np.zeros(k, bool)
        in_tail[p[p >= keep_m] - keep_m] = True
        fillers = arr[keep_m:m][~in_tail]
        arr[holes] = fillers
        self.pos[fillers] = holes
        self.size[u] = keep_m

    def sample(self, u: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """`k` distinct members of level u in random order."""
        m = int(self.size[u])
        picks = rng.permutation(m) if k >= m else rng.choice(m, size=k, replace=False)
        return self.members[u][picks]

    @property
    def live(self) -> int:
        return int(self.size.sum())


class RingPool:
    def __init__(self, slots: int, image_shape: tuple[int, int, int], device: str | torch.device = "cpu",
                 max_reuse: int = 8, max_age: int = 2000, dataset_size: int = 0):
        if slots < 1:
            raise ValueError(f"online.ring_slots must be >= 1, got {slots}")
        if max_reuse < 1 or max_age < 1:
            raise ValueError("online.max_reuse and online.max_age must be >= 1")
        self.slots = slots
        self.image_shape = tuple(image_shape)
        self.max_reuse = max_reuse
        self.max_age = max_age
        self.images = torch.zeros((slots, *self.image_shape), dtype=torch.uint8, device=device)
        self.counts: Counter = Counter()  # accepted, rejected, evicted_*, hit, draw, dropped_at_resume ...
        self.age_at_use: list[int] = []  # recent ages at use, for the age distribution
        self.uses_at_eviction: list[int] = []  # reuse distribution
        self.dropped_entries = _no_entries()  # what the last resume lost (for `refill`)
        self._clear(dataset_size)

    def _clear(self, dataset_size: int = 0) -> None:
        """Every slot empty. Per-slot metadata lives on the host: it is tiny."""
        n = self.slots
        self.index = np.full(n, EMPTY, dtype=np.int64)
        self.variant = np.full(n, EMPTY, dtype=np.int64)
        self.birth = np.zeros(n, dtype=np.int64)
        self.uses = np.zeros(n, dtype=np.int64)
        self._head = np.full(max(int(dataset_size), 1), EMPTY, np.int64)  # image -> first slot
        self._next = np.full(n, EMPTY, np.int64)  # next slot of the same image
        self._prev = np.full(n, EMPTY, np.int64)
        self._levels = _Levels(self.max_reuse, n)
        self._mark = np.zeros(n, bool)  # scratch: slots excluded from a draw
        self._seq = np.zeros(n, np.int64)  # bumped when a slot takes a new entry: heap items go stale
        self._by_birth: list = []  # (birth, slot, seq) of live entries: they age out oldest first
        self._expired: list = []  # past a reuse or age limit: the first victims
        self._used: list = []  # used at least once: victims when nothing has expired
        self._filled = 0  # slots [0, _filled) have held an entry; the others are free
        self._occupied = self._sum_birth = self._sum_uses = 0
        self._clock: Optional[int] = None  # the latest step seen

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_slot(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def nbytes(self) -> int:
        return self.slots * self.bytes_per_slot

    def fill(self) -> float:
        return self._occupied / self.slots

    @property
    def live_count(self) -> int:
        return self._levels.live

    @property
    def dropped_at_resume(self) -> int:
        """SASI that were in the ring at a checkpoint this run resumed from (pixels are not saved)."""
        return int(self.counts["dropped_at_resume"])

    # ------------------------------------------------------------------ liveness
    def _age_out(self, step: int) -> None:
        """Entries born before step - max_age leave the live levels for the expired heap."""
        if self._clock is not None and step <= self._clock:
            return
        self._clock = step
        limit, heap = step - self.max_age, self._by_birth
        while heap and heap[0][0] < limit:
            birth, slot, seq = heapq.heappop(heap)
            if self._seq[slot] == seq and self._levels.level[slot] != EMPTY:
                self._levels.remove_one(slot)
                heapq.heappush(self._expired, (birth, slot, seq))

    def _top(self, heap: list) -> Optional[tuple]:
        while heap and self._seq[heap[0][1]] != heap[0][2]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _victim(self, step: int) -> tuple[Optional[int], Optional[str]]:
        self._age_out(step)
        if self._filled < self.slots:
            return self._filled, None
        for heap, reason in ((self._expired, "expired"), (self._used, "oldest_used")):
            top = self._top(heap)
            if top is not None:
                return int(top[1]), reason
        return None, None

    def can_accept(self, step: int) -> bool:
        return self._victim(step)[0] is not None

    # ------------------------------------------------------------------ producer side
    def put(self, image_index: int, variant: int, image: torch.Tensor, step: int) -> bool:
        """Store one SASI (uint8, `image_shape`). False means: full of unused live entries, wait."""
        if tuple(image.shape) != self.image_shape or image.dtype != torch.uint8:
            raise ValueError(f"ring slot expects uint8 {self.image_shape}, got {image.dtype} {tuple(image.shape)}")
        if int(image_index) < 0:
            raise ValueError(f"ring entries need an image index >= 0, got {image_index}")
        slot, reason = self._victim(step)
        if slot is None:
            self.counts["rejected"] += 1
            return False
        self._take(slot, reason)
        self.images[slot].copy_(image, non_blocking=True)
        self._insert(slot, int(image_index), int(variant), int(step), 0)
        self.counts["accepted"] += 1
        return True

    def _take(self, slot: int, reason: Optional[str]) -> None:
        """Empty `slot` for a new entry (a free slot, or an eviction counted by reason)."""
        if reason is None:
            self._filled += 1
            return
        uses = int(self.uses[slot])
        self.counts[f"evicted_{reason}"] += 1
        if uses == 0:
            self.counts["evicted_unused"] += 1
        self.uses_at_eviction.append(uses)
        self._levels.remove_one(slot)
        self._unlink(slot)
        self._occupied -= 1
        self._sum_birth -= int(self.birth[slot])
        self._sum_uses -= uses

    def _insert(self, slot: int, image_index: int, variant: int, birth: int, uses: int) -> None:
        self._seq[slot] += 1
        seq = int(self._seq[slot])
        self.index[slot], self.variant[slot], self.birth[slot], self.uses[slot] = image_index, variant, birth, uses
        self._link(slot, image_index)
        self._occupied += 1
        self._sum_birth += birth
        self._sum_uses += uses
        if uses:
            heapq.heappush(self._used, (birth, slot, seq))
        if uses >= self.max_reuse:
            heapq.heappush(self._expired, (birth, slot, seq))
        else:
            self._levels.add_one(slot, uses)
            heapq.heappush(self._by_birth, (birth, slot, seq))
        self._maybe_compact()

    def _link(self, slot: int, image_index: int) -> None:
        if image_index >= self._head.size:  # the table grows to the largest index seen
            grown = np.full(max(2 * self._head.size, image_index + 1), EMPTY, np.int64)
            grown[:self._head.size] = self._head
            self._head = grown
        first = int(self._head[image_index])
        self._next[slot], self._prev[slot] = first, EMPTY
        if first != EMPTY:
            self._prev[first] = slot
        self._head[image_index] = slot

    def _unlink(self, slot: int) -> None:
        before, after = int(self._prev[slot]), int(self._next[slot])
        if before != EMPTY:
            self._next[before] = after
        else:
            self._head[int(self.index[slot])] = after
        if after != EMPTY:
            self._prev[after] = before

    def _maybe_compact(self) -> None:
        """Stale heap items pile up as slots are reused; rebuild the heaps now and then."""
        if len(self._by_birth) + len(self._expired) + len(self._used) < 6 * self.slots + 4096:
            return
        occ = np.flatnonzero(self.index != EMPTY)
        live = self._levels.level[occ] != EMPTY

        def heap_of(sel: np.ndarray) -> list:
            h = list(zip(self.birth[sel].tolist(), sel.tolist(), self._seq[sel].tolist()))
            heapq.heapify(h)
            return h

        self._by_birth, self._expired = heap_of(occ[live]), heap_of(occ[~live])
        self._used = heap_of(occ[self.uses[occ] > 0])

    # ------------------------------------------------------------------ trainer side
    def _live_slots_of(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, slot) for every live entry of each image: a walk along the images' chains."""
        ok = (images >= 0) & (images < self._head.size)
        cur = np.full(images.size, EMPTY, np.int64)
        cur[ok] = self._head[images[ok]]
        rows = np.arange(images.size)
        out_rows, out_slots = [], []
        while True:
            keep = cur != EMPTY
            if not keep.any():
                break
            rows, cur = rows[keep], cur[keep]
            out_rows.append(rows)
            out_slots.append(cur)
            cur = self._next[cur]
        if not out_slots:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        r, s = np.concatenate(out_rows), np.concatenate(out_slots)
        live = self._levels.level[s] != EMPTY
        return r[live], s[live]

    def _use(self, slots: np.ndarray, step: int) -> list[RingHit]:
        """Count one use of each of `slots` (distinct, live) and describe them."""
        if slots.size == 0:
            return []
        old = self.uses[slots]
        new = old + 1
        self._levels.remove(slots)
        self.uses[slots] = new
        self._sum_uses += int(slots.size)
        births, seqs = self.birth[slots], self._seq[slots]
        for sel, heap in ((old == 0, self._used), (new >= self.max_reuse, self._expired)):
            for item in zip(births[sel].tolist(), slots[sel].tolist(), seqs[sel].tolist()):
                heapq.heappush(heap, item)
        stay = new < self.max_reuse
        for u in np.unique(new[stay]):
            self._levels.add(slots[stay & (new == u)], int(u))
        ages = (step - births).tolist()
        self.age_at_use.extend(ages)
        if len(self.age_at_use) > _AGE_HISTORY:
            del self.age_at_use[:len(self.age_at_use) - _AGE_HISTORY // 2]
        return [RingHit(*t) for t in zip(slots.tolist(), self.index[slots].tolist(),
                                         self.variant[slots].tolist(), ages, new.tolist())]

    def lookup(self, indices: Iterable[int], step: int, rng: np.random.Generator) -> list[Optional[RingHit]]:
        """A live SASI for each image index of the batch, or None; the least-used variant wins
        (ties at random). An index that repeats takes its image's next entry."""
        self._age_out(step)
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, np.int64).reshape(-1)
        hits: list[Optional[RingHit]] = [None] * idx.size
        rank = _repeat_rank(idx)
        for r in range(int(rank.max()) + 1 if idx.size else 0):  # one round unless indices repeat
            rows = np.flatnonzero(rank == r)
            cand_rows, cand = self._live_slots_of(idx[rows])
            if cand.size == 0:
                continue
            order = np.lexsort((self.uses[cand] + rng.random(cand.size), cand_rows))
            cand_rows, cand = cand_rows[order], cand[order]
            first = np.r_[True, cand_rows[1:] != cand_rows[:-1]]
            for k, hit in zip(rows[cand_rows[first]].tolist(), self._use(cand[first], step)):
                hits[k] = hit
        self.counts["hit"] += sum(h is not None for h in hits)
        return hits

    def draw(self, n: int, step: int, rng: np.random.Generator, exclude: Iterable[int] = frozenset()) -> list[RingHit]:
        """Up to `n` random live entries (distinct slots), fewest uses first, none of an
        image in `exclude`."""
        self._age_out(step)
        if n <= 0 or self._levels.live == 0:
            return []
        ex = np.fromiter((int(i) for i in exclude), np.int64)
        _, ex_slots = self._live_slots_of(ex)
        ex_per_level = np.bincount(self._levels.level[ex_slots], minlength=self.max_reuse)
        self._mark[ex_slots] = True
        picked, need = [], int(n)
        for u in np.flatnonzero(self._levels.size).tolist():
            # sampling `need` + (excluded members of the level) leaves `need` usable ones
            cand = self._levels.sample(u, min(int(self._levels.size[u]), need + int(ex_per_level[u])), rng)
            if ex_per_level[u]:
                cand = cand[~self._mark[cand]]
            picked.append(cand[:need])
            need -= picked[-1].size
            if need == 0:
                break
        self._mark[ex_slots] = False
        out = self._use(np.concatenate(picked) if picked else np.empty(0, np.int64), step)
        self.counts["draw"] += len(out)
        return out

    def image(self, slot: int) -> torch.Tensor:
        return self.images[slot]

    # ------------------------------------------------------------------ metrics and state
    def stats(self, step: int) -> dict:
        self._age_out(step)
        occ = self._occupied
        return {
            "ring/fill": self.fill(),
            "ring/live": self._levels.live / self.slots,
            "ring/age_mean": float(step - self._sum_birth / occ) if occ else 0.0,
            "ring/uses_mean": float(self._sum_uses / occ) if occ else 0.0,
            **{f"ring/{k}": float(v) for k, v in self.counts.items()},
        }

    def state_dict(self) -> dict:
        """Metadata of the entries held and the counters: a few bytes per entry, no pixels."""
        occ = self.index != EMPTY
        return {"version": STATE_VERSION, "slots": self.slots, "image_shape": list(self.image_shape),
                **{k: torch.from_numpy(getattr(self, k)[occ].copy()) for k in ("index", "variant", "birth", "uses")},
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the counters come back, the slots start empty (a checkpoint holds no pixels).

        What the ring held is counted as `dropped_at_resume` (never-used ones also as
        `dropped_unused_at_resume`) and kept in `dropped_entries` for `refill`. Any ring
        size resumes any checkpoint; a version-1 checkpoint's images are ignored."""
        entries = {k: state[k].numpy().astype(np.int64) for k in ("index", "variant", "birth", "uses")}
        held = entries["index"] != EMPTY  # version 1 saved every slot, empty ones too
        self.dropped_entries = {k: v[held].copy() for k, v in entries.items()}
        self._clear(self._head.size)
        self.counts = Counter(state["counts"])
        self.counts["dropped_at_resume"] += int(held.sum())
        self.counts["dropped_unused_at_resume"] += int((self.dropped_entries["uses"] == 0).sum())

    def drop_pending(self, indices: Iterable[int], variants: Iterable[int], birth: int) -> None:
        """SASI that had arrived but waited outside the ring (the trainer's backlog) when a
        checkpoint was taken: dropped at resume like the ring's own entries, refillable."""
        idx = np.fromiter((int(i) for i in indices), np.int64)
        var = np.fromiter((int(v) for v in variants), np.int64)
        if idx.size != var.size:
            raise ValueError(f"{idx.size} indices for {var.size} variants")
        extra = {"index": idx, "variant": var, "birth": np.full(idx.size, int(birth), np.int64),
                 "uses": np.zeros(idx.size, np.int64)}
        self.dropped_entries = {k: np.concatenate([self.dropped_entries[k], extra[k]]) for k in extra}
        self.counts["dropped_at_resume"] += int(idx.size)
        self.counts["dropped_unused_at_resume"] += int(idx.size)

    def refill(self, load: Callable[[int, int], Optional[torch.Tensor]], step: int,
               limit: Optional[int] = None) -> int:
        """Put back entries a resume dropped, with their birth and use counts, from `load(index,
        variant)` (a uint8 `image_shape` tensor, or None when it cannot be had, e.g. from the
        store behind the run). Unused entries go first; expired ones are skipped. Returns how
        many came back (counted as `refilled_at_resume`)."""
        e = self.dropped_entries
        alive = (e["uses"] < self.max_reuse) & (step - e["birth"] <= self.max_age)
        order = np.flatnonzero(alive)[np.argsort(e["uses"][alive], kind="stable")]
        done = 0
        for k in order[:limit].tolist():
            image = load(int(e["index"][k]), int(e["variant"][k]))
            slot, reason = (None, None) if image is None else self._victim(step)
            if slot is None or reason is not None:  # only into free slots: never evict for old SASI
                continue
            self._take(slot, None)
            self.images[slot].copy_(image, non_blocking=True)
            self._insert(slot, int(e["index"][k]), int(e["variant"][k]), int(e["birth"][k]), int(e["uses"][k]))
            done += 1
        self.dropped_entries = _no_entries()
        self.counts["refilled_at_resume"] += done
        return done


def to_device_index(values, device: torch.device) -> torch.Tensor:
    """int64 index tensor on `device` without a blocking copy (pinned, non_blocking on CUDA)."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _no_entries() -> dict:
    return {k: np.empty(0, np.int64) for k in ("index", "variant", "birth", "uses")}


def _repeat_rank(idx: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same value (0 for the first)."""
    if idx.size == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    first = np.r_[True, s[1:] != s[:-1]]
    pos = np.arange(idx.size)
    rank = np.empty(idx.size, np.int64)
    rank[order] = pos - np.maximum.accumulate(np.where(first, pos, 0))
    return rank
