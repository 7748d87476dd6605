"""Where a trainer's micro-batches come from: one interface, three sources.

- `OfflineBatches`   real images, SASI (if any) from a store written before the run;
- `OnlineBatches`    SASI from the ring, filled by producer ranks over the transport
                     (online.mode=launched) or by a producer inside this trainer
                     (online.mode=colocated); see online/ring_source.py. Pairs built on
                     the host in this process (augment.backend=dali);
- `OnlineDeviceBatches`  the same ring, with real views from DataLoader workers (uint8,
                     pinned) and ring SASI made into views on the trainer's device
                     (augment.backend=torchvision; online/device_views.py).

The loop (training/loop.py) calls, per micro-step, `next(m)` -> (views, outcome counts);
at a checkpoint `checkpoint(ckpt_dir, step, micro_step, save_fn)` (a quiet point for the
online sources); on a log step `metrics(micro_steps_done)` (collective over the trainers'
control group) and `postfix(record)`; once at the end `finish(out_dir, module)`. On log
steps `supply_problem(final)` (collective for the online sources) says why a run that asked
for SASI gets none; `fail(message)` records it before the loop stops the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch


def iterate(make: Callable, first: int, last: int, num_workers: int, pin: bool = False) -> Iterator:
    """(views, outcomes) of micro-steps first..last-1, optionally from loader workers
    (`pin`: into pinned host memory, for non-blocking copies to a GPU). The workers start
    here, when the source starts, not inside the first training step."""
    if num_workers <= 0:
        return ((b.views, dict(b.outcomes)) for b in map(make, range(first, last)))
    from sasi_online.train import _MicroBatchDataset

    loader = torch.utils.data.DataLoader(_MicroBatchDataset(make, first, last), batch_size=None,
                                         shuffle=False, num_workers=num_workers, pin_memory=pin,
                                         worker_init_fn=_one_thread)
    return iter(loader)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


class OfflineBatches:
    """No online generation: the pair builder reads the store (or nothing) directly."""

    online = None

    def __init__(self, make: Callable, store_source: Any, num_workers: int):
        self.make, self.store_source, self.num_workers = make, store_source, num_workers
        self._it: Optional[Iterator] = None
        self._next_m: Optional[int] = None

    def start(self, first_micro: int, last_micro: int) -> None:
        self._it = iterate(self.make, first_micro, last_micro, self.num_workers)
        self._next_m = first_micro

    def next(self, m: int):
        if m != self._next_m:
            raise RuntimeError(f"micro-step {m} asked, {self._next_m} expected")
        self._next_m += 1
        return next(self._it)

    def state_dict(self) -> dict:
        return self.store_source.state_dict() if self.store_source is not None else {}

    def load_state_dict(self, state: dict, ckpt_dir: Path, step: int) -> None:
        if self.store_source is not None and state:
            self.store_source.load_state_dict(state)

    def checkpoint(self, ckpt_dir: Path, step: int, micro_step: int, save_fn: Callable[[], None]) -> None:
        save_fn()

    def metrics(self, micro_steps_done: int) -> dict:
        return {}

    def postfix(self, record: dict) -> dict:
        return {}

    def supply_problem(self, final: bool) -> Optional[str]:
        return None  # offline: the store was checked when it was opened

    def fail(self, message: str) -> None:
        return None

    def finish(self, out_dir: Optional[Path], module: Any) -> None:
        return None


class OnlineBatches(OfflineBatches):
    """SASI from this trainer's ring (online.OnlineTrainer: launched or co-located feed)."""

    def __init__(self, make: Callable, online: Any, uses_sasi: bool, num_workers: int = 0):
        # pairs from the ring are built in this process; without SASI the loader may use workers
        super().__init__(make, online.source if uses_sasi else None, num_workers=0 if uses_sasi else num_workers)
        self.online = online

    def start(self, first_micro: int, last_micro: int) -> None:
        super().start(first_micro, last_micro)
        self.online.wait_for_start(first_micro)  # producers load models: not a step's wait

    def next(self, m: int):
        self.online.before_micro_step(m)
        return super().next(m)

    def load_state_dict(self, state: dict, ckpt_dir: Path, step: int) -> None:
        super().load_state_dict(state, ckpt_dir, step)
        self.online.load(ckpt_dir, step)

    def checkpoint(self, ckpt_dir: Path, step: int, micro_step: int, save_fn: Callable[[], None]) -> None:
        self.online.save(ckpt_dir, step, micro_step, save_fn)  # a quiet point

    def metrics(self, micro_steps_done: int) -> dict:
        return self.online.metrics.record(micro_steps_done)

    def postfix(self, record: dict) -> dict:
        return self.online.metrics.postfix(record)

    def supply_problem(self, final: bool) -> Optional[str]:
        return self.online.supply_problem(final)

    def fail(self, message: str) -> None:
        self.online.fail(message)

    def finish(self, out_dir: Optional[Path], module: Any) -> None:
        self.online.finish(out_dir, module)


class OnlineDeviceBatches(OnlineBatches):
    """Online with augment.backend=torchvision: real views decoded and augmented (uint8) in
    train.num_workers DataLoader workers, ring SASI made into views on the trainer's device
    (online/device_views.py). The workers never see the ring, so they may run ahead."""

    def __init__(self, real_views: Callable, device_views: Any, online: Any, num_workers: int):
        super().__init__(real_views, online, uses_sasi=True)
        self.device_views, self.num_workers = device_views, num_workers

    def start(self, first_micro: int, last_micro: int) -> None:
        self._it = iterate(self.make, first_micro, last_micro, self.num_workers,
                           pin=self.online.device.type == "cuda")
        self._next_m = first_micro
        self.online.wait_for_start(first_micro)

    def next(self, m: int):
        self.online.before_micro_step(m)
        worker_views, _ = OfflineBatches.next(self, m)
        views, outcomes = self.device_views(m, worker_views)
        return views, dict(outcomes)


def build_source(cfg: Any, roles: Any, dataset: Any, sampler: Any, builder_for: Callable) -> Any:
    """The source for this run. `builder_for(sasi_source)` makes the PairBuilder."""
    from sasi_online.data.pairs import NEEDS_SASI
    from sasi_online.online.settings import online_enabled
    from sasi_online.train import MicroBatches, open_sasi_source

    t = cfg.train
    rank = roles.trainer_rank
    if not online_enabled(cfg):
        store_source = open_sasi_source(cfg, dataset)
        make = MicroBatches(dataset, sampler, builder_for(store_source), t.seed, rank)
        return OfflineBatches(make, store_source, t.num_workers)
    from sasi_online.online.ring_source import OnlineTrainer

    online = OnlineTrainer(cfg, roles, dataset, sampler, as_numpy=cfg.augment.backend == "dali")
    uses_sasi = t.pair_mode in NEEDS_SASI
    builder = builder_for(online.source if uses_sasi else None)
    if uses_sasi and cfg.augment.backend == "torchvision":
        from sasi_online.online.device_views import DeviceViewBatches, RealViews

        online.source.on_device = True  # ring images stay on the trainer's device
        device_views = DeviceViewBatches(sampler, builder, online.source, t.seed, rank, online.device,
                                         cfg.data.image_size)
        return OnlineDeviceBatches(RealViews(dataset, sampler, builder, t.seed, rank), device_views, online,
                                   t.num_workers)
    if uses_sasi:  # DALI: pairs built on the host in this process
        make = online.micro_batches(dataset, sampler, builder, t.seed, rank)
    else:
        make = MicroBatches(dataset, sampler, builder, t.seed, rank)
    return OnlineBatches(make, online, uses_sasi, t.num_workers)
