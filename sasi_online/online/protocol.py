"""Producer ↔ trainer coordination through the job's c10d key-value store.

Small control messages travel beside the SASI tensors, never inside collectives, so a
producer busy with a long generation batch never stalls a trainer step:

- `step`      trainers' current micro-step (first trainer publishes it; look-ahead reads it);
- saves       the first trainer announces checkpoint k at step N; each producer writes its own
              state into the tag folder, stops sending, and reports how many messages it sent
              to each trainer; trainers receive exactly those, save, and mark k done; the
              producer then resumes. The checkpoint is a quiet point: every SASI generated
              before it is in a ring, a backlog or a producer's outbox — never in flight;
- `done`      each trainer reports the end of its steps; producers send STOP and finish;
- `drained`   each trainer reports it took every message up to every producer's STOP;
- `end`       every rank arrives; the first trainer (it hosts the store) leaves last;
- stats       each producer publishes its counters (SASI made, failures, busy time) as JSON;
- `failure`   the first trainer's reason for stopping a run that gets no SASI (health.py):
              every producer reads it at the end and exits with it.

No wait here blocks: counters use `store.add(key, 0)` (a missing key reads as 0) and keys
are checked before they are read, polled every POLL_S. A blocking `store.get` or a
barrier would run into the process groups' timeout whenever one peer is slow (a producer
loading models for minutes, or inside a long batch at a quiet point).

The store lives in the first trainer's process, so a waiting rank reads it politely: one
request per poll, several counters at once (`counters`: one `multi_get`; each counter is
created at 0 by one `add(key, 0)` the first time, so the read never waits on a missing key).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

_P = "sasi_online"
# Seconds between two reads of the job's store by a rank that waits (a producer with nothing
# to do, a trainer waiting for a producer's answer): ~50 requests/s, and a state change is
# seen within 20 ms, short against a training step of a GPU trainer at these batch sizes.
POLL_S = 0.02


@dataclass(frozen=True)
class ProducerView:
    """What a producer reads once per loop iteration (one store request)."""
    trainers_done: bool
    saves_requested: int
    trainer_step: int


class Coordination:
    def __init__(self, store: Any, num_trainers: int, poll_s: float = POLL_S):
        self.store = store
        self.num_trainers = num_trainers
        self.poll_s = poll_s
        self._published_step = 0
        self._created: set[str] = set()  # counters this process made sure exist

    def counters(self, *names: str) -> list[int]:
        """Several counters in one request (`multi_get`); missing ones are created at 0 first."""
        keys = [f"{_P}/{n}" for n in names]
        for key in keys:
            if key not in self._created:
                self.store.add(key, 0)  # creates it at 0, or reads it: never overwrites
                self._created.add(key)
        return [int(v) for v in self.store.multi_get(keys)]

    def producer_view(self) -> ProducerView:
        done, saves, step = self.counters("trainers_done", "saves_announced", "step")
        return ProducerView(done >= self.num_trainers, saves, step)

    # ------------------------------------------------------------------ step
    def publish_step(self, step: int) -> None:
        """Trainer 0: the micro-step now being trained (kept as a counter: add the delta)."""
        if step != self._published_step:
            self.store.add(f"{_P}/step", step - self._published_step)
            self._published_step = step

    def trainer_step(self) -> int:
        return int(self.store.add(f"{_P}/step", 0))

    # ------------------------------------------------------------------ saves
    def request_save(self, step: int) -> int:
        """Trainer 0: announce a checkpoint at `step`; returns its sequence number k (1, 2, ...)."""
        k = int(self.store.add(f"{_P}/saves_announced", 0)) + 1
        self.store.set(f"{_P}/save/{k}/step", str(step))
        self.store.add(f"{_P}/saves_announced", 1)
        return k

    def saves_requested(self) -> int:
        return int(self.store.add(f"{_P}/saves_announced", 0))

    def save_step(self, k: int) -> int:
        return int(self._poll_get(f"{_P}/save/{k}/step"))

    def report_sent(self, k: int, producer: int, sent: dict[int, int]) -> None:
        """Producer: state written, sending paused; messages sent to each trainer so far."""
        self.store.set(f"{_P}/save/{k}/sent/{producer}", json.dumps({str(t): n for t, n in sent.items()}))

    def _poll_get(self, key: str) -> bytes:
        while not self.store.check([key]):
            time.sleep(self.poll_s)
        return self.store.get(key)

    def sent_by(self, k: int, producer: int) -> dict[int, int]:
        """Trainer: waits (polling) until `producer` has reported for save k."""
        return {int(t): n for t, n in json.loads(self._poll_get(f"{_P}/save/{k}/sent/{producer}")).items()}

    def mark_saved(self, k: int) -> None:
        self.store.add(f"{_P}/save/{k}/done", 1)

    def wait_saved(self, k: int) -> None:
        """Producer: wait until the first trainer finished checkpoint k (or every trainer
        finished its steps): one read of both counters per poll."""
        while True:
            saved, done = self.counters(f"save/{k}/done", "trainers_done")
            if saved >= 1 or done >= self.num_trainers:
                return
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------ end
    def trainer_finished(self) -> None:
        self.store.add(f"{_P}/trainers_done", 1)

    def trainers_done(self) -> bool:
        return int(self.store.add(f"{_P}/trainers_done", 0)) >= self.num_trainers

    def trainer_drained(self) -> None:
        self.store.add(f"{_P}/trainers_drained", 1)

    def wait_drained(self) -> None:
        """Producer: until every trainer took every message up to this producer's STOP."""
        while int(self.store.add(f"{_P}/trainers_drained", 0)) < self.num_trainers:
            time.sleep(self.poll_s)

    def meet_at_end(self, rank: int, world: int) -> None:
        """Every rank arrives; then each leaves. Rank 0 hosts the store, so it waits until
        every other rank has also stopped reading it ("left")."""
        self.store.add(f"{_P}/end/arrived", 1)
        while int(self.store.add(f"{_P}/end/arrived", 0)) < world:
            time.sleep(self.poll_s)
        self.store.add(f"{_P}/end/left", 1)
        if rank == 0:
            while int(self.store.add(f"{_P}/end/left", 0)) < world:
                time.sleep(self.poll_s)

    # ------------------------------------------------------------------ a failed run
    def publish_failure(self, message: str) -> None:
        self.store.set(f"{_P}/failure", message)

    def failure(self) -> str:
        key = f"{_P}/failure"
        return self.store.get(key).decode("utf-8") if self.store.check([key]) else ""

    # ------------------------------------------------------------------ producer stats
    def publish_stats(self, producer: int, stats: dict) -> None:
        self.store.set(f"{_P}/producer/{producer}/stats", json.dumps(stats))

    def producer_stats(self, producer: int) -> dict:
        key = f"{_P}/producer/{producer}/stats"
        if not self.store.check([key]):
            return {}
        return json.loads(self.store.get(key))
