"""Where a trainer's SASI come from: producer ranks over the transport (launched mode).

A feed is what `OnlineTrainer` (ring_source.py) polls; the co-located feed (colocated.py)
has the same methods:
  poll(m)              SasiBatches that are ready now (never blocks)
  exhausted            no more SASI will come (every producer stopped)
  models_loaded()      a producer reported its models loaded (health.py's clock starts)
  idle                 nothing ready and nothing in progress this instant (start-up wait)
  quiet_point(k, ...)  before checkpoint k: take everything producers sent before it
  save_state / load_state   this trainer's producer-side state in a checkpoint folder
  publish_final()      last producer stats, before the run summary reads them
  finish(take)         the end: drain up to every producer's STOP, report drained
  producer_stats()     the published stats of each producer (list of dicts)
  meet_at_end()        every rank arrives, store host leaves last
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .protocol import Coordination
from .transport import SasiReceiver


class LaunchedFeed:
    def __init__(self, cfg: Any, roles: Any, coord: Coordination, pin: bool):
        from .slots import slot_shape

        o = cfg.online
        self.roles, self.coord = roles, coord
        self.receiver = SasiReceiver(roles.producer_ranks, o.send_batch, slot_shape(cfg), roles.transport_group,
                                     buffers=o.credits, store=coord.store, pin=pin)

    def start(self) -> None:
        return None

    def poll(self, m: int, start: bool = False) -> list:
        return self.receiver.poll()

    @property
    def exhausted(self) -> bool:
        return self.receiver.all_stopped

    @property
    def idle(self) -> bool:
        return True  # producers work in other processes: the caller sleeps a little

    def models_loaded(self) -> bool:
        return any(s.get("models_loaded") for s in self.producer_stats())

    def quiet_point(self, k: int, take: Callable[[Any], None]) -> None:
        """Take exactly the messages each producer reported sending before checkpoint k
        (polling: a producer inside a long batch answers late, never too late)."""
        for p in self.roles.producer_ranks:
            target = self.coord.sent_by(k, p).get(self.roles.rank, 0)
            while self.receiver.messages[p] < target:
                for batch in self.receiver.poll():
                    take(batch)
                time.sleep(0.0005)

    def save_state(self, folder: Path) -> None:
        return None  # producers write their own state into the tag folder

    def load_state(self, folder: Path) -> None:
        return None

    def publish_final(self) -> None:
        return None  # producer ranks publish their own stats

    def finish(self, take: Callable[[Any], None]) -> None:
        while not self.receiver.all_stopped:
            for batch in self.receiver.poll():
                take(batch)
            time.sleep(0.001)
        self.coord.trainer_drained()

    def producer_stats(self) -> list[dict]:
        return [self.coord.producer_stats(i) for i in range(len(self.roles.producer_ranks))]

    def meet_at_end(self) -> None:
        self.coord.meet_at_end(self.roles.rank, self.roles.world_size)
