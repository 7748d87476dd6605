"""Ring replay-pool rules: capacity, eviction order, reuse and age limits, backpressure."""
import numpy as np
import pytest
import torch

from sasi_online.online.ring import RingPool

SHAPE = (4, 4, 3)


def img(v):
    return torch.full(SHAPE, v, dtype=torch.uint8)


def rng():
    return np.random.default_rng(0)


def test_memory_is_fixed_at_start():
    ring = RingPool(5, SHAPE, max_reuse=2, max_age=10)
    assert ring.nbytes == 5 * 4 * 4 * 3 == ring.images.numel()
    for i in range(20):
        ring.put(i, 0, img(i), step=0) or ring.lookup([i - 5], step=0, rng=rng())
    assert ring.images.numel() == ring.nbytes


def test_backpressure_when_all_unused_and_fresh():
    ring = RingPool(3, SHAPE, max_reuse=2, max_age=10)
    assert all(ring.put(i, 0, img(i), step=0) for i in range(3))
    assert not ring.can_accept(step=0)
    assert ring.put(99, 0, img(99), step=0) is False
    assert ring.counts["rejected"] == 1
    assert set(ring.index.tolist()) == {0, 1, 2}  # nothing unseen was thrown away


def test_oldest_used_entry_is_evicted_first():
    ring = RingPool(3, SHAPE, max_reuse=5, max_age=100)
    for i, step in zip(range(3), (0, 1, 2)):
        ring.put(i, 0, img(i), step=step)
    ring.lookup([2, 1], step=3, rng=rng())  # 1 and 2 used once; 0 never used
    assert ring.put(10, 0, img(10), step=3)
    assert 1 not in ring.index.tolist()  # 1 is the oldest *used* entry
    assert 0 in ring.index.tolist() and 2 in ring.index.tolist()
    assert ring.counts["evicted_oldest_used"] == 1


def test_reuse_limit_expires_entries_and_they_go_first():
    ring = RingPool(2, SHAPE, max_reuse=2, max_age=100)
    ring.put(0, 0, img(0), step=0)
    ring.put(1, 0, img(1), step=1)
    r = rng()
    assert ring.lookup([1], step=2, rng=r)[0] is not None
    assert ring.lookup([1], step=2, rng=r)[0].uses == 2
    assert ring.lookup([1], step=2, rng=r) == [None]  # past its reuse limit
    ring.lookup([0], step=2, rng=r)  # 0 used once, older than 1
    ring.put(5, 0, img(5), step=3)
    assert 1 not in ring.index.tolist()  # expired beats oldest-used
    assert ring.counts["evicted_expired"] == 1


def test_age_limit():
    ring = RingPool(2, SHAPE, max_reuse=10, max_age=5)
    ring.put(7, 0, img(7), step=0)
    assert ring.lookup([7], step=5, rng=rng())[0].age == 5
    assert ring.lookup([7], step=6, rng=rng()) == [None]
    assert ring.draw(4, step=6, rng=rng()) == []
    ring.put(8, 0, img(8), step=6)
    ring.put(9, 0, img(9), step=6)  # takes 7's expired slot, no backpressure
    assert sorted(ring.index.tolist()) == [8, 9]


def test_lookup_returns_the_right_image_and_prefers_least_used_variant():
    ring = RingPool(4, SHAPE, max_reuse=5, max_age=100)
    ring.put(3, 0, img(30), step=0)
    ring.put(3, 1, img(31), step=0)
    r = rng()
    first = ring.lookup([3], step=1, rng=r)[0]
    second = ring.lookup([3], step=1, rng=r)[0]
    assert {first.variant, second.variant} == {0, 1}
    assert int(ring.image(first.slot)[0, 0, 0]) == 30 + first.variant


def test_draw_excludes_indices_and_counts():
    ring = RingPool(4, SHAPE, max_reuse=5, max_age=100)
    for i in range(4):
        ring.put(i, 0, img(i), step=0)
    got = ring.draw(10, step=1, rng=rng(), exclude={0, 1})
    assert sorted(h.image_index for h in got) == [2, 3]
    assert ring.counts["draw"] == 2


def test_state_holds_metadata_and_counters_and_a_resumed_ring_starts_empty():
    ring = RingPool(3, SHAPE, max_reuse=4, max_age=50)
    ring.put(1, 2, img(11), step=4)
    ring.put(2, 0, img(12), step=4)
    ring.lookup([1], step=5, rng=rng())
    state = ring.state_dict()
    assert "images" not in state and state["index"].tolist() == [1, 2]
    other = RingPool(2, (8, 8, 3), max_reuse=4, max_age=50)  # any ring size resumes: it starts empty
    other.load_state_dict(state)
    assert other.fill() == 0 and other.lookup([1, 2], step=6, rng=rng()) == [None, None]
    assert other.dropped_at_resume == 2 and other.counts["dropped_unused_at_resume"] == 1
    assert {k: v for k, v in other.counts.items() if "resume" not in k and k != "hit"} == \
        {k: v for k, v in ring.counts.items() if k != "hit"}
    assert other.counts["hit"] == ring.counts["hit"] == 1
    other.load_state_dict(other.state_dict())  # a second resume keeps the first one's count
    assert other.dropped_at_resume == 2


def test_a_checkpoint_of_the_earlier_format_resumes_without_its_pixels():
    slots = 4  # version 1 saved every slot (empty ones as -1) and the images
    old = {"images": torch.ones((slots, *SHAPE), dtype=torch.uint8),
           "index": torch.tensor([5, -1, 7, -1]), "variant": torch.tensor([0, -1, 1, -1]),
           "birth": torch.tensor([1, 0, 2, 0]), "uses": torch.tensor([0, 0, 3, 0]), "counts": {"accepted": 2}}
    ring = RingPool(slots, SHAPE)
    ring.load_state_dict(old)
    assert ring.fill() == 0 and ring.dropped_at_resume == 2 and ring.counts["accepted"] == 2
    assert ring.dropped_entries["index"].tolist() == [5, 7]


def test_refill_puts_dropped_entries_back_with_their_uses():
    ring = RingPool(4, SHAPE, max_reuse=3, max_age=50)
    for i in range(3):
        ring.put(i, 0, img(i), step=0)
    ring.lookup([0, 0, 0, 1], step=1, rng=rng())  # 0 is past its reuse limit, 1 used once
    back = RingPool(4, SHAPE, max_reuse=3, max_age=50)
    back.load_state_dict(ring.state_dict())
    asked = []
    n = back.refill(lambda i, v: asked.append(i) or (None if i == 2 else img(40 + i)), step=2)
    assert n == 1 and asked == [2, 1]  # unused first; the expired entry of 0 is not asked for
    hit = back.lookup([1], step=2, rng=rng())[0]
    assert hit.uses == 2 and hit.age == 2 and int(back.image(hit.slot)[0, 0, 0]) == 41
    assert back.counts["refilled_at_resume"] == 1 and back.dropped_entries["index"].size == 0


def test_checkpoint_size_does_not_grow_with_image_bytes(tmp_path):
    sizes = {}
    for side in (4, 64):
        for slots in (64, 256):
            ring = RingPool(slots, (side, side, 3), max_reuse=4, max_age=50)
            for i in range(slots):
                ring.put(i, 0, img(1).new_full((side, side, 3), i % 255), step=0)
            path = tmp_path / f"{side}_{slots}.pt"
            torch.save(ring.state_dict(), path)
            sizes[side, slots] = path.stat().st_size
    # no pixels in it: 64x64x3 images (12 KiB a slot) cost what 4x4x3 ones do
    assert abs(sizes[4, 256] - sizes[64, 256]) < 64 and abs(sizes[4, 64] - sizes[64, 64]) < 64
    per_slot = (sizes[64, 256] - sizes[64, 64]) / 192
    assert per_slot <= 4 * 8 + 8  # four int64 per held entry, against 12 KiB of pixels per slot


def test_vectorised_ring_keeps_the_rules_of_a_full_slot_scan():
    """Random puts, lookups and draws against the rules written as scans over every slot."""
    ring = RingPool(16, SHAPE, max_reuse=3, max_age=20)
    r = np.random.default_rng(5)
    step = 0
    for t in range(600):
        step += int(r.random() < 0.3)
        occupied = ring.index != -1
        live = occupied & (ring.uses < 3) & (step - ring.birth <= 20)
        op = r.choice(3, p=(0.8, 0.1, 0.1) if t // 50 % 2 else (0.2, 0.4, 0.4))  # phases: puts, then uses
        if op == 0:  # put: free slot, else oldest expired, else oldest used, else refuse
            before = (ring.index.copy(), ring.birth.copy(), ring.uses.copy())
            expired = occupied & ~live
            if not occupied.all():
                want = int(np.flatnonzero(~occupied)[0])
            elif expired.any():
                want = int(np.flatnonzero(expired)[np.argmin(before[1][expired])])
            elif (before[2] > 0).any():
                want = int(np.flatnonzero(before[2] > 0)[np.argmin(before[1][before[2] > 0])])
            else:
                want = None
            ok = ring.put(int(r.integers(30)), 0, img(1), step)
            changed = np.flatnonzero((ring.index != before[0]) | (ring.birth != before[1]) | (ring.uses != before[2]))
            assert ok == (want is not None)
            assert changed.tolist() in (([want], []) if ok else ([],))
        elif op == 1:  # lookup: a hit iff the image has a live entry, and the least used one
            batch = r.integers(30, size=6).tolist()
            uses = ring.uses.copy()
            for i, hit in zip(batch, ring.lookup(batch, step, rng())):
                mine = np.flatnonzero(live & (ring.index == i))
                if hit is None:
                    assert mine.size == 0
                    continue
                assert hit.slot in mine and uses[hit.slot] == uses[mine].min() and hit.image_index == i
                uses[hit.slot] += 1
                live[hit.slot] = uses[hit.slot] < 3
        else:  # draw: distinct live slots outside `exclude`, the fewest-used ones
            exclude = set(r.integers(30, size=4).tolist())
            allowed = np.flatnonzero(live & ~np.isin(ring.index, list(exclude)))
            uses = ring.uses.copy()
            got = ring.draw(int(r.integers(1, 8)), step, rng(), exclude=exclude)
            slots = [h.slot for h in got]
            assert len(set(slots)) == len(slots) == min(len(allowed), len(got)) and set(slots) <= set(allowed.tolist())
            assert sorted(uses[slots].tolist()) == sorted(uses[allowed].tolist())[:len(slots)]
            assert len(got) == min(len(allowed), len(got))
        assert ring.fill() == float((ring.index != -1).mean())
        stats = ring.stats(step)
        assert stats["ring/live"] == pytest.approx(float(((ring.index != -1) & (ring.uses < 3)
                                                          & (step - ring.birth <= 20)).mean()))


def test_put_checks_dtype_and_shape():
    ring = RingPool(2, SHAPE)
    with pytest.raises(ValueError, match="uint8"):
        ring.put(0, 0, torch.zeros(SHAPE), step=0)


def test_slots_hold_sasi_and_real_image_at_the_trainers_side():
    """Producers resize once to what the recipe crops (256 px for 224 px views); a slot is
    [SASI, its real image], so a 256 px pair takes half a 512 px SASI's bytes."""
    from PIL import Image

    from sasi_online.config import Config
    from sasi_online.online.slots import REAL, SASI, make_slots, slot_shape, slot_side

    cfg = Config()
    cfg.augment.recipe, cfg.data.image_size = "mocov2", 224
    assert slot_side(cfg) == 256
    cfg.augment.recipe = "dino"  # local crops are smaller than the global ones: the globals decide
    assert slot_side(cfg) == 256
    cfg.online.slot_side = 200
    assert slot_shape(cfg) == (2, 200, 200, 3)
    cfg.online.slot_side = 0
    pair = RingPool(1, slot_shape(cfg)).bytes_per_slot
    assert RingPool(1, (512, 512, 3)).bytes_per_slot / pair == 2.0
    sasi = np.zeros((2, 64, 64, 3), np.uint8)
    sasi[:, :, 32:] = 255  # right half white
    reals = [Image.new("RGB", (48, 32), (10, 20, 30)), np.full((20, 20, 3), 7, np.uint8)]
    slots = make_slots(sasi, reals, 16)
    assert slots.shape == (2, 2, 16, 16, 3) and slots.dtype == torch.uint8
    assert int(slots[0, SASI, 0, 0, 0]) == 0 and int(slots[0, SASI, 0, -1, 0]) == 255
    assert slots[0, REAL].reshape(-1, 3).unique(dim=0).tolist() == [[10, 20, 30]]
    assert int(slots[1, REAL].max()) == 7
