"""Producer and trainer timing in one process, with the real ring, sampler and planner.

Time is counted in trainer micro-steps. A producer makes `sasi_per_step` SASI per step
(fractions accumulate) in batches of `gen_batch`; a batch planned at step s reaches the
trainer's ring at step s + `latency` (generation + transfer). Each step the trainer
looks up its batch's indices in the ring (hits), draws other live entries for the rest
(draws), else falls back. Use it to size `online.lookahead`, `ring_slots` and `max_age`
before a run, and to show what look-ahead buys (tests/test_online_lookahead.py).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import torch

from sasi_online.data.sampler import StepSampler

from .lookahead import LookaheadPlanner
from .ring import RingPool


@dataclass
class SimulationResult:
    hit_rate: float  # samples whose own image had a SASI in the ring
    draw_rate: float  # samples paired with another image's SASI from the pool
    fallback_rate: float  # samples with neither (classic second view)
    generated: int
    accepted: int
    rejected: int  # backpressure: the ring refused (full of unused live entries)
    skipped_steps: int


def simulate(*, dataset_size: int, batch_size: int, steps: int, lookahead: int, sasi_per_step: float,
             gen_batch: int = 8, latency: int = 2, ring_slots: int = 256, max_reuse: int = 8,
             max_age: int = 2000, seed: int = 0) -> SimulationResult:
    sampler = StepSampler(dataset_size, batch_size, 1, seed=seed)
    planner = LookaheadPlanner(sampler, lookahead, seed=seed)
    ring = RingPool(ring_slots, (1, 1, 1), max_reuse=max_reuse, max_age=max_age)
    pixel = torch.zeros((1, 1, 1), dtype=torch.uint8)
    rng = np.random.default_rng(seed)
    in_flight: deque = deque()  # (arrival step, [jobs])
    backlog: list = []  # arrived but refused by the ring: retried each step
    counts: Counter = Counter()
    budget = 0.0
    for step in range(steps):
        while in_flight and in_flight[0][0] <= step:
            backlog.extend(in_flight.popleft()[1])
        keep = []
        for job in backlog:
            if not ring.put(job.index, 0, pixel, step):
                keep.append(job)
        backlog = keep
        budget = min(budget + sasi_per_step, 2 * gen_batch)  # an idle producer banks no work
        while budget >= gen_batch and len(backlog) < ring_slots:
            jobs = planner.next_jobs(step, gen_batch)
            if not jobs:
                break
            budget -= len(jobs)
            counts["generated"] += len(jobs)
            in_flight.append((step + latency, jobs))
            planner.observe_latency(latency)
        indices = sampler.indices(step, 0)
        hits = ring.lookup(indices, step, rng)
        misses = sum(h is None for h in hits)
        draws = ring.draw(misses, step, rng, exclude=set(indices))
        counts["hit"] += len(indices) - misses
        counts["draw"] += len(draws)
        counts["fallback"] += misses - len(draws)
    total = max(steps * batch_size, 1)
    return SimulationResult(counts["hit"] / total, counts["draw"] / total, counts["fallback"] / total,
                            counts["generated"], ring.counts["accepted"], ring.counts["rejected"],
                            planner.skipped_steps)
