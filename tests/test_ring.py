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


def test_state_round_trip_and_shape_check():
    ring = RingPool(3, SHAPE, max_reuse=4, max_age=50)
    ring.put(1, 2, img(11), step=4)
    ring.lookup([1], step=5, rng=rng())
    other = RingPool(3, SHAPE, max_reuse=4, max_age=50)
    other.load_state_dict(ring.state_dict())
    assert torch.equal(other.images, ring.images)
    assert other.uses.tolist() == ring.uses.tolist() and other.counts == ring.counts
    with pytest.raises(ValueError, match="ring_slots"):
        RingPool(2, SHAPE).load_state_dict(ring.state_dict())


def test_put_checks_dtype_and_shape():
    ring = RingPool(2, SHAPE)
    with pytest.raises(ValueError, match="uint8"):
        ring.put(0, 0, torch.zeros(SHAPE), step=0)
