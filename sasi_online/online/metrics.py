"""Online metrics for the trainer's logger (JSONL + TensorBoard) and progress line.

`OnlineMetrics.record()` is collective over the trainers' gloo control group (call it on
every trainer at the same logged steps; host values only, nothing on the model plane);
it returns one flat dict of floats:
  online/hit_rate, draw_rate, store_rate, fallback_rate   this interval, over all trainers
  online/hit_rate_total                                   since the start of the run
  online/ring_fill, ring_bytes, backlog                   ring state (mean / per trainer)
  online/producer_sasi_per_s, producer_busy               producers (their published stats)
  online/sasi_received, sasi_per_image_mean/_max, images_with_sasi   multiplicity so far
  online/age_p50/_p90, reuse_mean/_p90                    age at use, uses at eviction
  online/poll_ms_per_step                                 trainer time spent receiving
  online/start_wait_s                                     the wait for online.start_sasi before step 1
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .groups import control_reduce
from .ring_source import FALLBACK, OUTCOMES, POOL_DRAW, RING_HIT, STORE


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


class OnlineMetrics:
    def __init__(self, online: Any):
        self.online = online
        self._last_outcomes = np.zeros(len(OUTCOMES))  # this trainer's counts at the last record
        self._last_generated = 0.0
        self._last_t = time.perf_counter()
        self._last_poll = 0.0
        self._last_steps = 0
        self._age_seen = 0

    @staticmethod
    def _sum(values: np.ndarray) -> np.ndarray:
        return control_reduce(values, "sum")

    def resumed(self, micro_step: int) -> None:
        """After a resume: the first interval starts here, not at the run's step 0 (the
        restored counters hold the whole run before the interruption)."""
        self._last_outcomes = np.array([self.online.source.counts[k] for k in OUTCOMES], dtype=np.float64)
        self._last_steps = micro_step

    def record(self, micro_steps_done: int) -> dict:
        o = self.online
        src, ring = o.source, o.ring
        n_tr = o.roles.num_trainers
        mine = np.array([src.counts[k] for k in OUTCOMES], dtype=np.float64)
        local = [*mine, *(mine - self._last_outcomes), o.counts["received"], ring.fill(), len(o.backlog), o.poll_s]
        tot = self._sum(np.array(local))
        outcomes, delta = tot[:4], tot[4:8]
        received, fill, backlog, poll = tot[8], tot[9] / n_tr, tot[10], tot[11] / n_tr
        per_image = self._sum(o.per_image)
        n = max(delta.sum(), 1.0)
        now = time.perf_counter()
        prod = o.producer_stats()
        generated = float(sum(p.get("generated", 0) for p in prod))
        # SASI/s from what producers made in this process: a resumed producer's totals start high
        generated_now = float(sum(p.get("generated_this_run", p.get("generated", 0)) for p in prod))
        busy = [p["busy_s"] / max(p["wall_s"], 1e-9) for p in prod if p]
        dt = max(now - self._last_t, 1e-9)
        steps = max(micro_steps_done - self._last_steps, 1)
        ages = ring.age_at_use[self._age_seen:] if self._age_seen <= len(ring.age_at_use) else ring.age_at_use
        rec = {
            "online/hit_rate": delta[OUTCOMES.index(RING_HIT)] / n,
            "online/draw_rate": delta[OUTCOMES.index(POOL_DRAW)] / n,
            "online/store_rate": delta[OUTCOMES.index(STORE)] / n,
            "online/fallback_rate": delta[OUTCOMES.index(FALLBACK)] / n,
            "online/hit_rate_total": outcomes[OUTCOMES.index(RING_HIT)] / max(outcomes.sum(), 1.0),
            "online/ring_fill": fill,
            "online/ring_bytes": float(ring.nbytes),
            "online/backlog": backlog,
            "online/producer_sasi_per_s": (generated_now - self._last_generated) / dt,
            "online/producer_busy": float(np.mean(busy)) if busy else 0.0,
            "online/producers_stopped": float(sum(p.get("stopped", 0) for p in prod)),
            "online/sasi_generated": generated,
            "online/sasi_received": received,
            "online/sasi_per_image_mean": float(per_image.mean()),
            "online/sasi_per_image_max": float(per_image.max()) if per_image.size else 0.0,
            "online/images_with_sasi": float((per_image > 0).mean()),
            "online/age_p50": _percentile(ages, 50),
            "online/age_p90": _percentile(ages, 90),
            "online/reuse_mean": float(np.mean(ring.uses_at_eviction)) if ring.uses_at_eviction else 0.0,
            "online/reuse_p90": _percentile(ring.uses_at_eviction, 90),
            "online/poll_ms_per_step": 1000.0 * (poll - self._last_poll) / steps,
            "online/start_wait_s": float(o.start_wait_s),
        }
        self._last_outcomes, self._last_generated, self._last_t = mine, generated_now, now
        self._last_poll, self._last_steps, self._age_seen = poll, micro_steps_done, len(ring.age_at_use)
        return rec

    @staticmethod
    def postfix(rec: dict) -> dict:
        """Short fields for the progress line."""
        return {"hit": f"{rec['online/hit_rate']:.2f}", "fill": f"{rec['online/ring_fill']:.2f}",
                "sasi/s": f"{rec['online/producer_sasi_per_s']:.1f}",
                "sasi/img": f"{rec['online/sasi_per_image_mean']:.2f}"}
