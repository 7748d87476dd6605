"""The producer rank's loop: plan → make SASI → send to the owning trainer, forever.

Each iteration: serve checkpoint requests (protocol.py), read the trainers' micro-step,
send what the outbox holds while credits last, then make one batch for the next jobs of
the look-ahead planner. A SASI goes to the trainer whose batch will contain its image
(look-ahead) or round-robin (random mode). Sends never block; the outbox only grows
while trainers hold no free credit, and the producer stops making new SASI when the
outbox is full (backpressure from the ring, through the trainer's credits).

`SasiFactory` (plan, make, write to the store, count) is shared with the co-located
producer inside a trainer (colocated.py); `Producer` adds the rank's outbox, sends and
checkpoint answers. Finished SASI on a GPU go to pinned host memory on a side stream
(transport.HostStager) and are sent over gloo once their copy event has completed.

Faults: anything raised inside one batch (bad output, out of memory, injected) is
logged and the batch is skipped. If the loop itself raises, the producer warns, sends
STOP so trainers fall back to pool draws and classic views, and keeps answering the
checkpoint protocol until the trainers finish, so the job still saves and ends cleanly.
When no producer is left (or no SASI came in time) the trainers stop the run at a
checkpoint (online/health.py) and every rank, this one included, exits with the error.
Every wait here polls the job's key-value store without blocking: a slow peer (a long
model load, a long batch) never runs a collective or a store read into its timeout. An
idle producer reads the store once per protocol.POLL_S (the trainers' state in one
request, the credits in at most one more) and publishes its stats at most every
STATS_EVERY_S, so that waiting producers do not load the first trainer, the store's host.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .lookahead import NO_STEP, LookaheadPlanner
from .protocol import Coordination
from .transport import HostStager, SasiSender, default_store, is_ready

log = logging.getLogger(__name__)

PRODUCER_STATE = "producer_rank{rank}.pt"
STATS_EVERY_S = 1.0  # an idle producer's stats (wall time, lead) refreshed at most this often


class InjectedFault(RuntimeError):
    """Raised on purpose by the online.fault_* hooks (tests and drills)."""


def _state_path(ckpt_dir: Path, step: int, rank: int) -> Path:
    from sasi_online.training.checkpoint import tag_of

    return ckpt_dir / tag_of(step) / PRODUCER_STATE.format(rank=rank)


def fault_applies(target: int, producer_id: int) -> bool:
    return target < 0 or target == producer_id


class SasiFactory:
    """Plan -> make -> (store) for one producer; counts and planning state."""

    def __init__(self, cfg: Any, dataset: Any, planner: Any, producer_id: int, label: str,
                 maker: Any = None, writes: Any = None):
        self.cfg, self.dataset, self.planner, self.maker = cfg, dataset, planner, maker
        self.producer_id, self.label = producer_id, label
        self.writes = writes or (lambda index: True)  # which image indices this process writes
        self.next_variant = np.zeros(len(dataset), dtype=np.int64)  # SASI per image planned so far
        self.counts: Counter = Counter()
        self.error: Optional[str] = None
        self.busy_s = 0.0
        self.t_start = time.perf_counter()
        # models loaded and a first batch tried (lazy compiles and engine builds happen in it):
        # from then on SASI should follow (health.py's first_sasi_timeout_s counts from here)
        self.loaded = False
        self.store = None  # SasiStore when store.write_online
        self.generated_before = 0  # SASI made before a resume (the counters are the run's)
        o = cfg.online
        self.fail_batch = o.fault_batch if fault_applies(o.fault_producer, producer_id) else -1
        self.fail_loop_after = o.fault_loop_after if fault_applies(o.fault_producer, producer_id) else -1
        self.delay_s = o.fault_delay_s if fault_applies(o.fault_delay_producer, producer_id) else 0.0
        self.fail_load = o.fault_load and fault_applies(o.fault_producer, producer_id)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"next_variant": torch.from_numpy(self.next_variant.copy()),
                "planner": json.dumps(self.planner.state_dict()),
                "counts": dict(self.counts), "error": self.error or ""}

    def load_state_dict(self, state: dict) -> None:
        nv = state["next_variant"].numpy()
        if nv.shape != self.next_variant.shape:
            raise ValueError(f"producer state is for {nv.shape[0]} images, the dataset has {len(self.dataset)}")
        self.next_variant = nv.copy()
        self.planner.load_state_dict(json.loads(state["planner"]))
        self.counts = Counter(state["counts"])
        self.generated_before = self.counts["generated"]

    def load_models(self) -> None:
        if self.fail_load:
            raise InjectedFault("online.fault_load=true: injected failure while loading the producer's models")
        if self.maker is None:
            from .maker import SasiMaker

            self.maker = SasiMaker(self.cfg, self.dataset)
        self._open_store()

    # ------------------------------------------------------------------ one batch
    def _write_store(self, made) -> None:
        if self.store is None:
            return
        from sasi_online.data.store import settings_hash
        from sasi_online.utils import DiskFullError
        from sasi_online.generation.offline import generation_settings

        s_hash = settings_hash(generation_settings(self.cfg, self.maker.kind))
        try:
            for j, (index, variant) in enumerate(zip(made.indices, made.variants)):
                if not self.writes(index) or (index, variant) in self.store:  # another writer's / written before
                    continue
                self.store.add(made.images[j], index=index, variant=variant, relpath=made.relpaths[j],
                               caption=made.captions[j], rewrite=made.rewrites[j], vp_kind=self.maker.kind,
                               seed=made.seeds[j], settings=s_hash, retries=made.retries[j])
                self.counts["stored"] += 1
        except DiskFullError as exc:
            warnings.warn(f"{self.label}: {exc}; no longer writing SASI to the store, "
                          f"still sending them to the trainers")
            self.store.close()
            self.store = None
            self.maker.store_images = False  # device SASI need no host copy any more

    def _jobs(self, now: int) -> tuple[list, dict]:
        items, by_item = [], {}
        for job in self.planner.next_jobs(now, self.cfg.generation.batch_size):
            variant = int(self.next_variant[job.index])
            self.next_variant[job.index] += 1
            items.append((job.index, variant))
            by_item[(job.index, variant)] = job
        return items, by_item

    def make_batch(self, batch_no: int, now: int):
        """Plan and make one batch at trainer micro-step `now`: (MadeBatch, jobs by item),
        or None when there is nothing to do or the batch failed (counted, skipped)."""
        if batch_no == 0 and self.delay_s > 0:
            time.sleep(self.delay_s)  # online.fault_delay_s: a long model load
            self.delay_s = 0.0  # once (batch 0 may be asked for again while there is nothing to plan)
        items, by_item = self._jobs(now)
        if not items:
            return None
        t0 = time.perf_counter()
        try:
            if batch_no == self.fail_batch:
                raise InjectedFault(f"online.fault_batch={batch_no}: injected failure inside a producer batch")
            made = self.maker.make(items)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end production
            log.warning("%s: batch %d failed and is skipped: %r", self.label, batch_no, exc)
            warnings.warn(f"{self.label}: batch {batch_no} failed and was skipped: {exc!r}")
            self.counts["failed_batches"] += 1
            self.counts["failed"] += len(items)
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        finally:
            self.busy_s += time.perf_counter() - t0
            self.loaded = True
        self.counts["failed"] += len(made.failed)
        self.counts["generated"] += len(made)
        self._write_store(made)
        return made, by_item

    def check_loop_fault(self, batch_no: int) -> None:
        if 0 <= self.fail_loop_after <= batch_no:
            raise InjectedFault(f"online.fault_loop_after={self.fail_loop_after}: injected failure of the producer loop")

    def stopped_by(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("%s stopped producing: %s", self.label, self.error, exc_info=True)
        warnings.warn(f"{self.label} STOPPED producing ({self.error}); the trainers go on with the other "
                      f"producers' SASI, and with none left they stop the run at a checkpoint "
                      f"(online.allow_fallback_only=true: they go on with classic second views)")

    def stats(self) -> dict:
        return {"generated": self.counts["generated"],
                "generated_this_run": self.counts["generated"] - self.generated_before,
                "failed": self.counts["failed"],
                "failed_batches": self.counts["failed_batches"], "sent": self.counts["sent"],
                "busy_s": self.busy_s, "wall_s": time.perf_counter() - self.t_start,
                "lead": self.planner.lead, "skipped_steps": self.planner.skipped_steps,
                "dropped_at_resume": self.counts["dropped_at_resume"],
                "models_loaded": int(self.loaded),
                "stopped": int(self.error is not None), "error": self.error or ""}

    def close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def _open_store(self) -> None:
        if not (self.cfg.store.write_online and self.cfg.store.path):
            return
        from sasi_online.data.store import SasiStore
        from sasi_online.generation.offline import dataset_identity, generation_settings, model_hashes

        kind = self.maker.kind
        self.store = SasiStore.create(self.cfg.store.path, dataset=dataset_identity(self.dataset),
                                      models=model_hashes(self.cfg, kind, self.maker.text.model_folders()),
                                      settings=generation_settings(self.cfg, kind),
                                      image_format=self.cfg.store.image_format)
        # online variants continue after the ones already in the store
        for i in range(len(self.dataset)):
            self.next_variant[i] = max(self.next_variant[i], self.store.next_variant(i))


class Producer(SasiFactory):
    """A producer rank: SASI go to the trainer whose batch holds their image, over gloo."""

    def __init__(self, cfg: Any, roles: Any, dataset: Any, sampler: Any, coordination: Coordination,
                 sender: Any, maker: Any = None):
        pid = roles.producer_ranks.index(roles.rank)
        planner = LookaheadPlanner(sampler, cfg.online.lookahead, pid, len(roles.producer_ranks),
                                   seed=cfg.train.seed)
        super().__init__(cfg, dataset, planner, pid, f"producer rank {roles.rank}", maker=maker)
        self.roles, self.coord, self.sender = roles, coordination, sender
        self.ckpt_dir = Path(cfg.train.out) / "checkpoints"
        # per trainer rank: (indices, variants, host images, copy event or None), oldest first
        self.outbox: dict[int, list[tuple]] = {t: [] for t in roles.trainer_ranks}
        self.saves_done = 0
        self.stager: Optional[HostStager] = None
        self._stats_at = float("-inf")  # when the stats were last published

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Counters, planning and the outbox's (index, variant) lists: no pixels. What the
        outbox held is dropped at a resume (`dropped_at_resume`), so over a run
        generated = received by trainers + outbox + dropped."""
        outbox = {str(t): [{"indices": torch.tensor(i, dtype=torch.int64), "variants": torch.tensor(v, dtype=torch.int64)}
                           for i, v, _, _ in msgs] for t, msgs in self.outbox.items()}
        return {**super().state_dict(), "outbox": outbox}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        lost = sum(len(m["indices"]) for msgs in state["outbox"].values() for m in msgs)
        self.counts["dropped_at_resume"] += lost  # their pixels were not saved
        self.outbox = {t: [] for t in self.roles.trainer_ranks}

    def resume(self) -> None:
        """Continue from the checkpoint the trainers resume from (same latest.json)."""
        from sasi_online.training import checkpoint as ckpt

        found = ckpt.latest(self.ckpt_dir) if self.cfg.train.resume else None
        if found is None:
            return
        ckpt.check_config(self.ckpt_dir, self.cfg)  # the trainers refuse a foreign checkpoint too
        path = _state_path(self.ckpt_dir, int(found[1]["step"]), self.roles.rank)
        if not path.is_file():
            warnings.warn(f"producer rank {self.roles.rank}: checkpoint {found[0]} has no producer state "
                          f"({path.name}); starting its accounting afresh")
            return
        self.load_state_dict(torch.load(path, weights_only=True))
        log.info("producer rank %d resumed from %s", self.roles.rank, found[0])

    # ------------------------------------------------------------------ checkpoints
    def serve_saves(self, requested: int) -> int:
        """Answer every announced checkpoint up to `requested` (ProducerView.saves_requested):
        write state, report sends, wait for the save. Returns how many it answered."""
        first = self.saves_done
        while self.saves_done < requested:
            k = self.saves_done + 1
            step = self.coord.save_step(k)
            path = _state_path(self.ckpt_dir, step, self.roles.rank)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(self.state_dict(), tmp)
                tmp.replace(path)  # atomic: a half-written state is never resumed from
            except Exception as exc:  # noqa: BLE001 - the trainers must not wait for an answer that never comes
                log.error("producer rank %d: state for checkpoint %d not written: %r", self.roles.rank, step, exc)
                warnings.warn(f"producer rank {self.roles.rank}: its state is missing from checkpoint step {step} "
                              f"({exc!r}); a resume from it starts this producer's accounting afresh")
            self.coord.report_sent(k, self.roles.rank, self.sender.sent)
            self.coord.wait_saved(k)
            self.saves_done = k
        return self.saves_done - first

    # ------------------------------------------------------------------ sending
    def _queue(self, made, jobs_by_item: dict) -> None:
        per_trainer: dict[int, list[int]] = {}
        for j, (index, variant) in enumerate(zip(made.indices, made.variants)):
            t = self.roles.trainer_ranks[jobs_by_item[(index, variant)].trainer_rank]
            per_trainer.setdefault(t, []).append(j)
        images = made.slots  # [n, 2, S, S, 3]: SASI and real image at the trainers' side
        if images.device.type == "cuda" and self.stager is None:
            self.stager = HostStager(images.device)
        size = self.cfg.online.send_batch
        for t, rows in per_trainer.items():
            for s in range(0, len(rows), size):
                part = rows[s: s + size]
                host, event = (self.stager.stage(images[part]) if self.stager is not None and images.is_cuda
                               else (images[part].clone(), None))
                self.outbox[t].append(([made.indices[j] for j in part], [made.variants[j] for j in part],
                                       host, event))

    def flush(self) -> None:
        """Send what the outbox holds while credits last (credits: at most one store read)."""
        for t, msgs in self.outbox.items():
            while msgs and is_ready(msgs[0][3]) and self.sender.send(t, msgs[0][0], msgs[0][1], msgs[0][2]):
                self.counts["sent"] += len(msgs.pop(0)[0])

    def outbox_full(self) -> bool:
        return sum(len(m) for m in self.outbox.values()) >= 2 * len(self.outbox)

    def produce_one(self, batch_no: int, now: int) -> Optional[int]:
        """Plan and make one batch at trainer micro-step `now`; returns the number of SASI
        queued, or None when there was nothing to plan (no batch tried)."""
        failed_before = self.counts["failed_batches"]
        got = self.make_batch(batch_no, now)
        if got is None:  # a failed batch (counted) or no job to plan
            return 0 if self.counts["failed_batches"] > failed_before else None
        made, by_item = got
        if len(made):
            self._queue(made, by_item)
        if by_item and next(iter(by_item.values())).step != NO_STEP:
            self.planner.observe_latency(self.coord.trainer_step() - now)
        return len(made)

    def publish_stats(self, force: bool = False) -> None:
        """After a batch (force) or, idle, at most every STATS_EVERY_S."""
        if force or time.perf_counter() - self._stats_at >= STATS_EVERY_S:
            self.coord.publish_stats(self.producer_id, self.stats())
            self._stats_at = time.perf_counter()

    # ------------------------------------------------------------------ loop
    def loop(self) -> None:
        batch_no = 0
        while not (view := self.coord.producer_view()).trainers_done:
            served = self.serve_saves(view.saves_requested)
            self.flush()
            if self.outbox_full():
                self.publish_stats()
                time.sleep(self.coord.poll_s)
                continue
            self.check_loop_fault(batch_no)
            now = self.coord.trainer_step() if served else view.trainer_step  # trainers moved on after a save
            made = self.produce_one(batch_no, now)
            if made is None:  # nothing to plan yet: the trainers are not far enough
                self.publish_stats()
                time.sleep(self.coord.poll_s)
                continue
            batch_no += 1
            self.publish_stats(force=True)
            self.flush()
            if not made:
                time.sleep(self.coord.poll_s)

    def run(self) -> dict:
        """The whole life of a producer rank; returns its final stats."""
        try:
            self.load_models()
            self.loop()
        except Exception as exc:  # noqa: BLE001 - the job must go on without this producer
            self.stopped_by(exc)
        self.publish_stats(force=True)  # the error, before trainers see STOP
        self.sender.stop()  # trainers stop waiting for this producer
        while not (view := self.coord.producer_view()).trainers_done:  # keep serving checkpoints
            self.serve_saves(view.saves_requested)
            time.sleep(self.coord.poll_s)
        self.serve_saves(view.saves_requested)
        self.publish_stats(force=True)
        self.close_store()
        return self.stats()


def run_producer(cfg: Any, roles: Any) -> dict:
    """Entry point of a producer rank (train.py's role branch)."""
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.sampler import StepSampler

    from .settings import check_online_config
    from .slots import slot_shape

    check_online_config(cfg)
    if torch.cuda.is_available():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dataset = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(dataset), cfg.train.batch_size, roles.num_trainers, seed=cfg.train.seed)
    coord = Coordination(default_store(), roles.num_trainers)
    sender = SasiSender(roles.trainer_ranks, cfg.online.send_batch, slot_shape(cfg), roles.transport_group,
                        credits=cfg.online.credits, store=coord.store)
    producer = Producer(cfg, roles, dataset, sampler, coord, sender)
    producer.resume()
    stats = producer.run()
    coord.wait_drained()  # every trainer has taken every message up to this producer's STOP
    sender.close()
    failure = coord.failure()  # read before the end: the store's host leaves last
    coord.meet_at_end(roles.rank, roles.world_size)
    if failure:
        from sasi_online.errors import OnlineGenerationError

        raise OnlineGenerationError(failure)
    return stats
