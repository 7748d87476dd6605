"""Look-ahead: producers replay the trainers' sampler; hit rate with it beats random choice."""
import pytest

from sasi_online.data.sampler import StepSampler
from sasi_online.online.lookahead import NO_STEP, LookaheadPlanner
from sasi_online.online.simulation import simulate


def test_planner_follows_the_sampler_ahead_of_the_trainers():
    sampler = StepSampler(200, 8, num_trainers=2, seed=3)
    planner = LookaheadPlanner(sampler, lookahead=4)
    jobs = planner.next_jobs(trainer_step=10, n=20)
    # first the images of step 11, then step 12: the order trainers reach them, and within a
    # step interleaved over the trainers (image k of trainer 0, of trainer 1, then image k + 1)
    expected = [(s, r, sampler.indices(s, r)[k]) for s in (11, 12) for k in range(8) for r in (0, 1)][:20]
    assert [(j.step, j.trainer_rank, j.index) for j in jobs] == expected
    # nothing beyond the look-ahead window; steps already passed are skipped
    assert all(j.step <= 14 for j in planner.next_jobs(10, 1000))
    assert planner.next_jobs(10, 5) == []
    later = planner.next_jobs(trainer_step=30, n=3)
    assert [j.step for j in later] == [31, 31, 31] and planner.skipped_steps > 0


def test_producers_split_each_step_without_overlap():
    sampler = StepSampler(120, 6, num_trainers=2, seed=0)
    planners = [LookaheadPlanner(sampler, 3, producer_id=p, num_producers=2) for p in range(2)]
    got = [[(j.step, j.index) for j in p.next_jobs(0, 100)] for p in planners]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted((s, i) for s, _, i in sampler.upcoming(1, 3))


def test_random_mode_and_state_round_trip():
    sampler = StepSampler(50, 5, seed=0)
    a = LookaheadPlanner(sampler, lookahead=0, seed=7)
    first = a.next_jobs(0, 6)
    assert all(j.step == NO_STEP and 0 <= j.index < 50 for j in first)
    b = LookaheadPlanner(sampler, lookahead=0, seed=7)
    b.load_state_dict(a.state_dict())
    assert [j.index for j in a.next_jobs(0, 6)] == [j.index for j in b.next_jobs(0, 6)]
    with pytest.raises(ValueError, match="lookahead"):
        LookaheadPlanner(sampler, lookahead=-1)


def test_lookahead_hit_rate_beats_random_choice_on_the_same_run():
    """Same data, ring, producer speed and latency; only the choice of images differs."""
    common = dict(dataset_size=2000, batch_size=32, steps=300, sasi_per_step=4, gen_batch=8, latency=2,
                  ring_slots=128, max_reuse=4, max_age=200, seed=1)
    with_lookahead = simulate(lookahead=16, **common)
    without = simulate(lookahead=0, **common)
    assert with_lookahead.generated == without.generated  # same production
    # a producer making 4 SASI per 32-image step can at best hit 4/32 = 0.125 of the samples
    assert with_lookahead.hit_rate > 0.08
    assert with_lookahead.hit_rate > 5 * without.hit_rate
    # every sample is accounted for once
    for r in (with_lookahead, without):
        assert r.hit_rate + r.draw_rate + r.fallback_rate == pytest.approx(1.0)


def _planned_per_trainer(steps_per_batch: float, trainers: int = 8, producers: int = 2, gen_batch: int = 6,
                         batches: int = 120):
    """Producers make a batch every `steps_per_batch` trainer steps (that is also its latency)
    and plan it at the trainers' step when they start it. SASI planned per trainer."""
    sampler = StepSampler(8 * 32 * 40, 32, num_trainers=trainers, seed=2)
    planners = [LookaheadPlanner(sampler, lookahead=64, producer_id=p, num_producers=producers)
                for p in range(producers)]
    per_trainer = [0] * trainers
    for p, planner in enumerate(planners):
        t = p * steps_per_batch / producers  # producers out of phase
        for _ in range(batches):
            jobs = planner.next_jobs(int(t), gen_batch)
            planner.observe_latency(steps_per_batch)
            assert all(job.step > t for job in jobs)  # never a step already reached
            for job in jobs:
                per_trainer[job.trainer_rank] += 1
            t += steps_per_batch
    return per_trainer


@pytest.mark.parametrize("steps_per_batch,gen_batch", [(0.5, 6), (5, 6), (40, 6), (0.5, 96)])
def test_every_trainer_gets_its_share_at_any_producer_speed(steps_per_batch, gen_batch):
    """8 trainers, 2 producers; with 96 per batch the producers outrun the trainers."""
    per_trainer = _planned_per_trainer(steps_per_batch, gen_batch=gen_batch)
    mean = sum(per_trainer) / len(per_trainer)
    assert mean > 0
    assert all(abs(n - mean) <= 0.2 * mean for n in per_trainer), per_trainer


def test_two_producers_split_every_trainers_batch():
    sampler = StepSampler(8 * 32 * 4, 32, num_trainers=8, seed=0)
    planners = [LookaheadPlanner(sampler, 1, producer_id=p, num_producers=2) for p in range(2)]
    shares = [planner._share(3) for planner in planners]
    for share in shares:  # half of each trainer's batch, whichever trainer
        assert sorted({j.trainer_rank for j in share}) == list(range(8)) and len(share) == 128
        assert all(sum(j.trainer_rank == r for j in share) == 16 for r in range(8))
    # a prefix of a share already spans the trainers: no trainer first
    assert len({j.trainer_rank for j in shares[0][:8]}) == 8
