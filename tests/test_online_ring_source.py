"""RingSource pairing order: own-image ring hit → pool draw (real image swapped) → store → fallback."""
import numpy as np
import pytest
import torch

from sasi_online.config import Config
from sasi_online.data.augment import build_augmenter
from sasi_online.data.datasets import build_dataset
from sasi_online.data.pairs import PairBuilder
from sasi_online.data.sampler import StepSampler
from sasi_online.data.sasi_source import HIT, MISSING, ArraySource
from sasi_online.online.ring import RingPool
from sasi_online.online.ring_source import FALLBACK, POOL_DRAW, RING_HIT, STORE, OnlineMicroBatches, RingSource

SHAPE = (2, 8, 8, 3)  # a slot: the SASI and its real image


def _img(value):
    """A slot whose SASI is `value` everywhere and whose real image is `value + 1`."""
    slot = torch.full(SHAPE, value, dtype=torch.uint8)
    slot[1] += 1
    return slot


def test_pairing_order_and_counts():
    ring = RingPool(4, SHAPE, max_reuse=1, max_age=100)
    ring.put(5, 0, _img(50), step=0)
    ring.put(7, 3, _img(70), step=0)
    store = ArraySource({8: [np.full(SHAPE[1:], 80, np.uint8)]})
    source = RingSource(ring, store_source=store)
    source.step = 1
    rng = np.random.default_rng(0)
    reals, hits = source.resolve([5, 6, 8], rng)
    assert hits[0].outcome == HIT and int(hits[0].image[0, 0, 0]) == 50  # own image's SASI
    # image 6 has none: the sample becomes (real image 7, SASI of 7)
    assert reals == [5, 7, 8] and hits[1].variant == 3 and int(hits[1].image[0, 0, 0]) == 70
    assert source.real_images[0] is None and int(source.real_images[1][0, 0, 0]) == 71  # no decode
    assert hits[2].outcome == HIT and int(hits[2].image[0, 0, 0]) == 80  # from the store
    assert dict(source.counts) == {RING_HIT: 1, POOL_DRAW: 1, STORE: 1}
    # both ring entries reached max_reuse=1: the same batch now falls back for 5 and 6
    reals, hits = source.resolve([5, 6], rng)
    assert reals == [5, 6] and [h.outcome for h in hits] == [MISSING, MISSING]
    assert source.counts[FALLBACK] == 2
    # get() after resolve returns that resolution (what PairBuilder calls)
    assert source.get([5, 6], rng) == hits


def test_ring_image_is_a_copy_not_the_slot():
    ring = RingPool(1, SHAPE, max_reuse=1, max_age=100)
    ring.put(1, 0, _img(10), step=0)
    source = RingSource(ring)
    hit = source.get([1], np.random.default_rng(0))[0]
    ring.put(2, 0, _img(20), step=1)  # the used slot is overwritten by the next arrival
    assert int(hit.image[0, 0, 0]) == 10


def test_micro_batch_uses_the_real_image_of_a_drawn_sasi():
    cfg = Config()
    cfg.data.image_size = 16
    cfg.augment.recipe = "mocov2"
    ds = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(ds), 4, seed=0)
    own = sampler.indices(0, 0)
    other = next(i for i in range(len(ds)) if i not in own)
    ring = RingPool(2, SHAPE, max_reuse=4, max_age=100)
    ring.put(own[0], 0, _img(90), step=0)
    ring.put(other, 0, _img(30), step=0)
    source = RingSource(ring)
    augmenter = build_augmenter(cfg.augment, 16)
    builder = PairBuilder("sasi_no_aug", augmenter, source)
    batch = OnlineMicroBatches(ds, sampler, builder, seed=0, trainer_rank=0, source=source)(0)
    assert batch.origins[1] == ["s", "s", "x", "x"]  # own hit, one draw, two classic fallbacks
    # the own hit's real image is the dataset's; the draw's is its slot's real row (no decode)
    plain = augmenter.apply("plain", [np.asarray(ds[own[0]].image), ring.images[1, 1].numpy()])
    torch.testing.assert_close(batch.views[0][:2], plain)
    assert source.counts[RING_HIT] == 1 and source.counts[POOL_DRAW] == 1


def test_metrics_after_a_resume_count_from_the_resume():
    """Restored counters hold the run before the interruption: the first logged interval
    after a resume rates only what happened since (outcomes, producer SASI/s)."""
    from collections import Counter
    from types import SimpleNamespace

    from sasi_online.online.metrics import OnlineMetrics

    class Coord:  # the published producer stats of a producer resumed with 90 SASI made before
        stats = {"generated": 90, "generated_this_run": 0, "busy_s": 0.0, "wall_s": 1.0}

        def producer_stats(self, i):
            return dict(self.stats)

    source = RingSource(RingPool(2, SHAPE))
    online = SimpleNamespace(source=source, ring=source.ring, roles=SimpleNamespace(num_trainers=1, producer_ranks=[1]),
                             counts=Counter(), backlog=[], poll_s=0.0, per_image=np.zeros(4, np.int64),
                             producer_stats=lambda: [Coord().producer_stats(0)], start_wait_s=0.0)
    metrics = OnlineMetrics(online)
    source.counts = Counter({RING_HIT: 0, FALLBACK: 100})  # restored: all fallbacks before the cut
    metrics.resumed(10)
    source.counts.update({RING_HIT: 3, FALLBACK: 1})
    Coord.stats = {**Coord.stats, "generated": 94, "generated_this_run": 4}
    t0 = metrics._last_t
    rec = metrics.record(12)
    assert rec["online/hit_rate"] == 0.75 and rec["online/fallback_rate"] == 0.25
    assert rec["online/hit_rate_total"] == 3 / 104 and rec["online/sasi_generated"] == 94
    assert rec["online/producer_sasi_per_s"] * (metrics._last_t - t0) == pytest.approx(4)  # not 94


def test_mix_mode_fetches_sasi_only_for_its_synthetic_half():
    """`mix` pairs (x, x) or (s, s): only the samples whose coin says synthetic look up,
    draw or use a ring entry, so the ring's use counts equal the SASI samples."""
    cfg = Config()
    cfg.data.image_size = 16
    cfg.augment.recipe = "mocov2"
    ds = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(ds), 16, seed=0)
    ring = RingPool(64, SHAPE, max_reuse=8, max_age=100)
    for m in range(2):
        for i in sampler.indices(m, 0):
            ring.put(i, 0, _img(i % 250), step=0)
    source = RingSource(ring)
    make = OnlineMicroBatches(ds, sampler, PairBuilder("mix", build_augmenter(cfg.augment, 16), source),
                              seed=0, trainer_rank=0, source=source)
    synthetic = 0
    for m in range(2):
        batch = make(m)
        synthetic += sum(o == "s" for o in batch.origins[0])
        assert batch.outcomes[HIT] == sum(o == "s" for o in batch.origins[0])
    assert 0 < synthetic < 32  # both halves present
    assert source.counts[RING_HIT] == synthetic and sum(source.counts.values()) == synthetic
    assert int(ring.uses.sum()) == synthetic and ring.counts["draw"] == 0


def test_producer_outbox_is_saved_without_pixels_and_dropped_at_resume():
    """generated = received + outbox + dropped: a resumed producer counts its saved outbox
    (indices only, no pixels) as dropped and starts with an empty one."""
    from types import SimpleNamespace

    from sasi_online.online.producer import Producer

    cfg = Config()
    ds = build_dataset(cfg.data, "train")
    roles = SimpleNamespace(rank=2, producer_ranks=[2], trainer_ranks=[0, 1])
    make = lambda: Producer(cfg, roles, ds, StepSampler(len(ds), 4, 2, seed=0), None, None)  # noqa: E731
    producer = make()
    producer.counts.update(generated=7, sent=4)
    producer.outbox[1] = [([3, 4], [0, 0], torch.zeros(2, *SHAPE, dtype=torch.uint8), None),
                          ([5], [1], torch.zeros(1, *SHAPE, dtype=torch.uint8), None)]
    state = producer.state_dict()
    assert not [t for msgs in state["outbox"].values() for m in msgs for t in m.values() if t.dtype == torch.uint8]
    back = make()
    back.load_state_dict(state)
    assert back.counts["dropped_at_resume"] == 3 and all(not m for m in back.outbox.values())
    assert back.counts["generated"] == back.counts["sent"] + 3 and back.stats()["dropped_at_resume"] == 3
