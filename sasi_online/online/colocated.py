"""online.mode=colocated: a producer inside each trainer process, on the trainer's device.

One GPU is enough (NCCL refuses two ranks on one device, so launched mode needs at least
two). Between micro-steps, every `online.colocated_every` of them, the trainer makes one
producer batch for the images of its own upcoming batches (the same look-ahead planner
as a producer rank, over this trainer's share of the sampler) and puts the SASI straight
into its ring as device tensors: no transport, nothing in flight, so a checkpoint is a
quiet point by construction.

The same machinery as launched mode: look-ahead, store writing behind the run, metrics
(stats published to the job's store as producer `trainer rank`), checkpoint/resume of the
planner and variant counters (`colocated_rank{r}.pt` in each tag folder), and fault
handling: a failed batch is skipped, a failed producer stops and the trainer goes on with
pool draws and classic views.

Several trainers: each produces for its own batches; store writes are partitioned by
image index (index mod trainers), so no two processes ever write one (index, variant).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from sasi_online.utils import derive_seed

from .lookahead import NO_STEP, LookaheadPlanner
from .producer import SasiFactory
from .protocol import Coordination
from .transport import SasiBatch

STATE = "colocated_rank{rank}.pt"


class OwnBatches:
    """The sampler as one trainer sees it: only its own batches (what it plans SASI for)."""

    def __init__(self, sampler: Any, trainer_rank: int):
        self.sampler, self.rank = sampler, trainer_rank
        self.n, self.batch_size, self.num_trainers = sampler.n, sampler.batch_size, 1

    def indices(self, step: int, trainer_rank: int = 0) -> list[int]:
        return self.sampler.indices(step, self.rank)

    def upcoming(self, first_step: int, steps: int) -> list[tuple[int, int, int]]:
        return [(s, 0, i) for s in range(first_step, first_step + steps) for i in self.sampler.indices(s, self.rank)]


def _on_device(cfg: Any, device: torch.device) -> Any:
    """The config with generation on the trainer's own device (generation.device=auto)."""
    if cfg.generation.device != "auto":
        return cfg
    return dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, device=str(device)))


class ColocatedFeed:
    """The feed of OnlineTrainer (see feeds.py for the interface) in co-located mode."""

    def __init__(self, cfg: Any, roles: Any, dataset: Any, sampler: Any, coord: Coordination,
                 device: torch.device, maker: Any = None):
        rank, trainers = roles.trainer_rank, roles.num_trainers
        planner = LookaheadPlanner(OwnBatches(sampler, rank), cfg.online.lookahead, 0, 1,
                                   seed=derive_seed(cfg.train.seed, "colocated", rank))
        self.factory = SasiFactory(_on_device(cfg, device), dataset, planner, producer_id=rank,
                                   label=f"co-located producer of trainer rank {rank}", maker=maker,
                                   writes=lambda index: index % trainers == rank)
        self.roles, self.coord, self.device = roles, coord, device
        self.rank, self.every = rank, cfg.online.colocated_every
        self.batch_no = 0
        self.stopped = False
        self._idle = False
        self._loaded = False

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Load the models; the first trainer creates the store before the others open it."""
        from .groups import control_barrier

        if self._loaded:
            return
        self._loaded = True
        if self.rank == 0:
            self._load()
        control_barrier()
        if self.rank != 0:
            self._load()

    def _load(self) -> None:
        try:
            self.factory.load_models()
        except Exception as exc:  # noqa: BLE001 - training goes on without SASI
            self._stop(exc)

    def _stop(self, exc: Exception) -> None:
        self.factory.stopped_by(exc)
        self.stopped = True
        self.coord.publish_stats(self.rank, self.factory.stats())

    # ------------------------------------------------------------------ each micro-step
    def poll(self, m: int, start: bool = False) -> list:
        """At start-up, or every `colocated_every` micro-steps: make one batch (blocking this
        trainer for one generation batch: the co-located trade-off)."""
        self._idle = False
        if self.stopped or not (start or m % self.every == 0):
            return []
        try:
            self.factory.check_loop_fault(self.batch_no)
            got = self.factory.make_batch(self.batch_no, m)
        except Exception as exc:  # noqa: BLE001 - the loop of this producer failed
            self._stop(exc)
            return []
        self.batch_no += 1
        self.coord.publish_stats(self.rank, self.factory.stats())
        if got is None or not len(got[0]):
            self._idle = True
            return []
        made, by_item = got
        if next(iter(by_item.values())).step != NO_STEP:
            self.factory.planner.observe_latency(1)  # made between steps: ready for the next one
        self.factory.counts["sent"] += len(made)  # slots: each SASI and its real image at the ring's side
        return [SasiBatch(-1, list(made.indices), list(made.variants), made.slots.to(self.device))]

    @property
    def exhausted(self) -> bool:
        return self.stopped

    @property
    def idle(self) -> bool:
        return self._idle

    def models_loaded(self) -> bool:
        return self.factory.loaded

    # ------------------------------------------------------------------ checkpoints
    def quiet_point(self, k: int, take: Callable[[Any], None]) -> None:
        return None  # nothing in flight: SASI reach the ring in the batch that made them

    def save_state(self, folder: Path) -> None:
        path = folder / STATE.format(rank=self.rank)
        torch.save(self.factory.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def load_state(self, folder: Path) -> None:
        path = folder / STATE.format(rank=self.rank)
        if not path.is_file():
            warnings.warn(f"checkpoint '{folder}' has no co-located producer state ({path.name}); "
                          f"its planning and accounting start afresh")
            return
        self.factory.load_state_dict(torch.load(path, weights_only=True))

    # ------------------------------------------------------------------ end
    def publish_final(self) -> None:
        self.coord.publish_stats(self.rank, self.factory.stats())
        self.factory.close_store()

    def finish(self, take: Callable[[Any], None]) -> None:
        return None

    def producer_stats(self) -> list[dict]:
        return [self.coord.producer_stats(i) for i in range(self.roles.num_trainers)]

    def meet_at_end(self) -> None:
        self.coord.meet_at_end(self.roles.rank, self.roles.world_size)
