"""Look-ahead: which images a producer generates for next.

The trainers' order is a pure function of (seed, micro-step, trainer rank)
(`data/sampler.py`), so a producer replays it and generates SASI for the images the
trainers will reach within `lookahead` micro-steps; a SASI that arrives before its step
is a ring *hit* for the image's own batch instead of a pool draw of another image.

The producer skips steps the trainers have passed and starts `lead` steps ahead, where
`lead` follows the measured latency of one producer batch (in trainer steps): aiming at
the very next step is wasted when a batch takes several steps to generate and send.

Balance over trainers. A step's images are split between the producers so that each
producer gets about 1/P of *every* trainer's batch, and a producer's share is interleaved
(image 0 of trainers 0..T-1, then image 1 ...), so any prefix of it serves all trainers
alike. A producer that falls behind jumps to a later step but keeps its position in the
share (it does not restart at the share's first image), so over its batches it rotates
through every trainer and every position of their batches at any producer speed.

With `lookahead = 0` producers pick images uniformly at random (no look-ahead): the
baseline a look-ahead run is compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sasi_online.utils import derive_seed

NO_STEP = -1  # a job without a target step (random mode)


@dataclass(frozen=True)
class Job:
    step: int  # micro-step at which the trainer reaches the image (NO_STEP: random mode)
    trainer_rank: int  # rank in the trainer group whose batch holds the image
    index: int  # dataset image index


class LookaheadPlanner:
    """The jobs of one producer, in the order the trainers will need them."""

    def __init__(self, sampler, lookahead: int, producer_id: int = 0, num_producers: int = 1,
                 seed: int = 0):
        if lookahead < 0:
            raise ValueError(f"online.lookahead must be >= 0, got {lookahead}")
        if not 0 <= producer_id < max(num_producers, 1):
            raise ValueError(f"producer id {producer_id} outside 0..{num_producers - 1}")
        self.sampler = sampler
        self.lookahead = lookahead
        self.producer_id = producer_id
        self.num_producers = max(num_producers, 1)
        self.next_step = 0  # first micro-step not yet fully planned
        self.offset = 0  # where in next_step's share planning (re)starts: rotates on jumps
        self.taken = 0  # jobs of next_step's share already planned
        self.lead = 1.0  # measured batch latency in trainer steps (EMA)
        self.skipped_steps = 0  # steps passed before they could be planned
        self._rng = np.random.default_rng(derive_seed(seed, "online-random-jobs", producer_id))
        self._round_robin = 0
        self._cached: tuple[int, list[Job]] = (-1, [])
        t, b = sampler.num_trainers, sampler.batch_size  # every step's share has this many jobs
        self._share_size = sum((k + r) % self.num_producers == producer_id for k in range(b) for r in range(t))

    # ------------------------------------------------------------------ planning
    def _share(self, step: int) -> list[Job]:
        """This producer's part of a step's images, interleaved over the trainers.

        Image k of trainer r goes to producer (k + r) mod P: each producer gets ~1/P of
        every trainer's batch, whatever T and P (k mod P alone would leave a producer
        only the even-numbered trainers when T and P are even), listed image by image
        rather than trainer after trainer."""
        if self._cached[0] != step:
            s, t, p = self.sampler, self.sampler.num_trainers, self.num_producers
            batches = [s.indices(step, r) for r in range(t)]
            jobs = [Job(step, r, batches[r][k]) for k in range(s.batch_size) for r in range(t)
                    if (k + r) % p == self.producer_id]
            self._cached = (step, jobs)
        return self._cached[1]

    def next_jobs(self, trainer_step: int, n: int) -> list[Job]:
        """Up to `n` jobs given the trainers' current micro-step (empty: nothing to do yet)."""
        if self.lookahead == 0:
            return self._random_jobs(n)
        first = trainer_step + max(1, math.ceil(self.lead))
        if self.next_step < first:  # behind: jump ahead, keep the position in the share
            self.skipped_steps += first - self.next_step
            size = max(self._share_size, 1)
            self.next_step, self.offset, self.taken = first, (self.offset + self.taken) % size, 0
        out: list[Job] = []
        while len(out) < n and self.next_step <= trainer_step + self.lookahead:
            share = self._share(self.next_step)
            take = min(n - len(out), len(share) - self.taken)
            out.extend(share[(self.offset + self.taken + k) % len(share)] for k in range(take))
            self.taken += take
            if self.taken >= len(share):
                self.next_step, self.taken = self.next_step + 1, 0
        return out

    def _random_jobs(self, n: int) -> list[Job]:
        out = []
        for index in self._rng.integers(0, self.sampler.n, size=n):
            out.append(Job(NO_STEP, self._round_robin % self.sampler.num_trainers, int(index)))
            self._round_robin += 1
        return out

    def observe_latency(self, steps: float) -> None:
        """A batch planned at trainer step s was delivered at step s + `steps`."""
        self.lead = 0.7 * self.lead + 0.3 * max(float(steps), 1.0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "offset": self.offset, "taken": self.taken, "lead": self.lead,
                "skipped_steps": self.skipped_steps, "round_robin": self._round_robin,
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.next_step, self.offset = int(state["next_step"]), int(state["offset"])
        self.taken = int(state.get("taken", 0))  # older states: the offset was what was taken
        if "taken" not in state:
            self.offset, self.taken = 0, int(state["offset"])
        self.lead, self.skipped_steps = float(state["lead"]), int(state["skipped_steps"])
        self._round_robin = int(state["round_robin"])
        self._rng.bit_generator.state = state["rng"]
