"""Look-ahead: producers replay the trainers' sampler; hit rate with it beats random choice."""
import pytest

from sasi_online.data.sampler import StepSampler
from sasi_online.online.lookahead import NO_STEP, LookaheadPlanner
from sasi_online.online.simulation import simulate


def test_planner_follows_the_sampler_ahead_of_the_trainers():
    sampler = StepSampler(200, 8, num_trainers=2, seed=3)
    planner = LookaheadPlanner(sampler, lookahead=4)
    jobs = planner.next_jobs(trainer_step=10, n=20)
    # first the images of step 11 (trainer 0 then 1), then step 12: the order trainers reach them
    expected = [(s, r, i) for s in (11, 12) for r in (0, 1) for i in sampler.indices(s, r)][:20]
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
