"""The producer rank's loop: plan → make SASI → send to the owning trainer, forever.

Each iteration: serve checkpoint requests (protocol.py), read the trainers' micro-step,
send what the outbox holds while credits last, then make one batch for the next jobs of
the look-ahead planner. A SASI goes to the trainer whose batch will contain its image
(look-ahead) or round-robin (random mode). Sends never block; the outbox only grows
while trainers hold no free credit, and the producer stops making new SASI when the
outbox is full (backpressure from the ring, through the trainer's credits).

Faults: anything raised inside one batch (bad output, out of memory, injected) is
logged and the batch is skipped. If the loop itself raises, the producer warns, sends
STOP so trainers fall back to pool draws and classic views, and keeps answering the
checkpoint protocol until the trainers finish, so the job still saves and ends cleanly.
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
import torch.distributed as dist

from .lookahead import NO_STEP, LookaheadPlanner
from .protocol import Coordination
from .transport import SasiSender, default_store

log = logging.getLogger(__name__)

PRODUCER_STATE = "producer_rank{rank}.pt"


class InjectedFault(RuntimeError):
    """Raised on purpose by the online.fault_* hooks (tests and drills)."""


def _state_path(ckpt_dir: Path, step: int, rank: int) -> Path:
    from sasi_online.training.checkpoint import tag_of

    return ckpt_dir / tag_of(step) / PRODUCER_STATE.format(rank=rank)


class Producer:
    def __init__(self, cfg: Any, roles: Any, dataset: Any, sampler: Any, coordination: Coordination,
                 sender: Any, maker: Any = None):
        self.cfg = cfg
        self.roles = roles
        self.dataset = dataset
        self.coord = coordination
        self.sender = sender
        self.maker = maker
        self.producer_id = roles.producer_ranks.index(roles.rank)
        self.planner = LookaheadPlanner(sampler, cfg.online.lookahead, self.producer_id,
                                        len(roles.producer_ranks), seed=cfg.train.seed)
        self.ckpt_dir = Path(cfg.train.out) / "checkpoints"
        self.next_variant = np.zeros(len(dataset), dtype=np.int64)  # SASI per image planned so far
        self.outbox: dict[int, list[tuple[list[int], list[int], torch.Tensor]]] = {t: [] for t in roles.trainer_ranks}
        self.counts: Counter = Counter()
        self.saves_done = 0
        self.error: Optional[str] = None
        self.busy_s = 0.0
        self.t_start = time.perf_counter()
        self.store = None  # SasiStore when store.write_online
        self.generated_before = 0  # SASI made before a resume (the counters are the run's)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        outbox = {str(t): [{"indices": torch.tensor(i, dtype=torch.int64), "variants": torch.tensor(v, dtype=torch.int64),
                            "images": im.cpu()} for i, v, im in msgs] for t, msgs in self.outbox.items()}
        return {"next_variant": torch.from_numpy(self.next_variant.copy()),
                "planner": json.dumps(self.planner.state_dict()),
                "outbox": outbox, "counts": dict(self.counts), "error": self.error or ""}

    def load_state_dict(self, state: dict) -> None:
        nv = state["next_variant"].numpy()
        if nv.shape != self.next_variant.shape:
            raise ValueError(f"producer state is for {nv.shape[0]} images, the dataset has {len(self.dataset)}")
        self.next_variant = nv.copy()
        self.planner.load_state_dict(json.loads(state["planner"]))
        self.outbox = {int(t): [(m["indices"].tolist(), m["variants"].tolist(), m["images"]) for m in msgs]
                       for t, msgs in state["outbox"].items()}
        self.counts = Counter(state["counts"])
        self.generated_before = self.counts["generated"]

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
    def serve_saves(self) -> None:
        """Answer every announced checkpoint: write state, report sends, wait for the save."""
        while self.saves_done < self.coord.saves_requested():
            k = self.saves_done + 1
            step = self.coord.save_step(k)
            path = _state_path(self.ckpt_dir, step, self.roles.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.state_dict(), tmp)
            tmp.replace(path)  # atomic: a half-written state is never resumed from
            self.coord.report_sent(k, self.roles.rank, self.sender.sent)
            self.coord.wait_saved(k, should_stop=self.coord.trainers_done)
            self.saves_done = k

    # ------------------------------------------------------------------ sending
    def _queue(self, made, jobs_by_item: dict) -> None:
        per_trainer: dict[int, list[int]] = {}
        for j, (index, variant) in enumerate(zip(made.indices, made.variants)):
            t = self.roles.trainer_ranks[jobs_by_item[(index, variant)].trainer_rank]
            per_trainer.setdefault(t, []).append(j)
        images = torch.from_numpy(np.ascontiguousarray(made.images))
        size = self.cfg.online.send_batch
        for t, rows in per_trainer.items():
            for s in range(0, len(rows), size):
                part = rows[s: s + size]
                self.outbox[t].append(([made.indices[j] for j in part], [made.variants[j] for j in part],
                                       images[part].clone()))

    def flush(self) -> None:
        for t, msgs in self.outbox.items():
            while msgs and self.sender.send(t, msgs[0][0], msgs[0][1], msgs[0][2]):
                self.counts["sent"] += len(msgs.pop(0)[0])

    def outbox_full(self) -> bool:
        return sum(len(m) for m in self.outbox.values()) >= 2 * len(self.outbox)

    # ------------------------------------------------------------------ one batch
    def _write_store(self, made) -> None:
        if self.store is None:
            return
        from sasi_online.data.store import settings_hash
        from sasi_online.errors import DiskFullError
        from sasi_online.generation.offline import generation_settings

        s_hash = settings_hash(generation_settings(self.cfg, self.maker.kind))
        try:
            for j, (index, variant) in enumerate(zip(made.indices, made.variants)):
                if (index, variant) in self.store:  # written before an interruption: same seed, same image
                    continue
                self.store.add(made.images[j], index=index, variant=variant, relpath=made.relpaths[j],
                               caption=made.captions[j], rewrite=made.rewrites[j], vp_kind=self.maker.kind,
                               seed=made.seeds[j], settings=s_hash, retries=made.retries[j])
                self.counts["stored"] += 1
        except DiskFullError as exc:
            warnings.warn(f"producer rank {self.roles.rank}: {exc}; no longer writing SASI to the store, "
                          f"still sending them to the trainers")
            self.store.close()
            self.store = None

    def produce_one(self, batch_no: int) -> int:
        """Plan and make one batch; returns the number of SASI queued (0: nothing to do)."""
        now = self.coord.trainer_step()
        jobs = self.planner.next_jobs(now, self.cfg.generation.batch_size)
        if not jobs:
            return 0
        items = []
        by_item = {}
        for job in jobs:
            variant = int(self.next_variant[job.index])
            self.next_variant[job.index] += 1
            items.append((job.index, variant))
            by_item[(job.index, variant)] = job
        t0 = time.perf_counter()
        try:
            if batch_no == self.cfg.online.fault_batch:
                raise InjectedFault(f"online.fault_batch={batch_no}: injected failure inside a producer batch")
            made = self.maker.make(items)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end production
            log.warning("producer rank %d: batch %d failed and is skipped: %r", self.roles.rank, batch_no, exc)
            warnings.warn(f"producer rank {self.roles.rank}: batch {batch_no} failed and was skipped: {exc!r}")
            self.counts["failed_batches"] += 1
            self.counts["failed"] += len(items)
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return 0
        finally:
            self.busy_s += time.perf_counter() - t0
        self.counts["failed"] += len(made.failed)
        self.counts["generated"] += len(made)
        self._write_store(made)
        if len(made):
            self._queue(made, by_item)
        if jobs[0].step != NO_STEP:
            self.planner.observe_latency(self.coord.trainer_step() - now)
        return len(made)

    # ------------------------------------------------------------------ loop
    def stats(self) -> dict:
        return {"generated": self.counts["generated"],
                "generated_this_run": self.counts["generated"] - self.generated_before,
                "failed": self.counts["failed"],
                "failed_batches": self.counts["failed_batches"], "sent": self.counts["sent"],
                "busy_s": self.busy_s, "wall_s": time.perf_counter() - self.t_start,
                "lead": self.planner.lead, "skipped_steps": self.planner.skipped_steps,
                "stopped": int(self.error is not None), "error": self.error or ""}

    def loop(self) -> None:
        batch_no = 0
        fail_after = self.cfg.online.fault_loop_after
        while not self.coord.trainers_done():
            self.serve_saves()
            self.flush()
            if self.outbox_full():
                time.sleep(self.coord.poll_s)
                continue
            if 0 <= fail_after <= batch_no:
                raise InjectedFault(f"online.fault_loop_after={fail_after}: injected failure of the producer loop")
            made = self.produce_one(batch_no)
            batch_no += 1
            self.coord.publish_stats(self.roles.producer_ranks.index(self.roles.rank), self.stats())
            self.flush()
            if not made:
                time.sleep(self.coord.poll_s)

    def run(self) -> dict:
        """The whole life of a producer rank; returns its final stats."""
        try:
            if self.maker is None:
                from .maker import SasiMaker

                self.maker = SasiMaker(self.cfg, self.dataset)
            self._open_store()
            self.loop()
        except Exception as exc:  # noqa: BLE001 - the job must go on without this producer
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("producer rank %d stopped producing: %s", self.roles.rank, self.error, exc_info=True)
            warnings.warn(f"producer rank {self.roles.rank} STOPPED producing ({self.error}); trainers go on "
                          f"with pool draws and classic second views, checkpoints and the end still work")
        self.sender.stop()  # trainers stop waiting for this producer
        pid = self.roles.producer_ranks.index(self.roles.rank)
        self.coord.publish_stats(pid, self.stats())
        while not self.coord.trainers_done():  # keep serving checkpoints
            self.serve_saves()
            time.sleep(self.coord.poll_s)
        self.serve_saves()
        self.coord.publish_stats(pid, self.stats())
        if self.store is not None:
            self.store.close()
        return self.stats()

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


def sender_device() -> torch.device:
    """NCCL sends from the producer's GPU; gloo from host memory."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_producer(cfg: Any, roles: Any) -> dict:
    """Entry point of a producer rank (train.py's role branch)."""
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.sampler import StepSampler

    from .settings import check_online_config

    check_online_config(cfg)
    if torch.cuda.is_available():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dataset = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(dataset), cfg.train.batch_size, roles.num_trainers, seed=cfg.train.seed)
    res = cfg.generation.resolution
    coord = Coordination(default_store(), roles.num_trainers)
    sender = SasiSender(roles.trainer_ranks, cfg.online.send_batch, (res, res, 3), roles.transport_group,
                        credits=cfg.online.credits, store=coord.store, device=sender_device())
    producer = Producer(cfg, roles, dataset, sampler, coord, sender)
    producer.resume()
    stats = producer.run()
    dist.barrier(group=roles.transport_group)  # trainers have drained every message (up to STOP)
    sender.close()
    return stats
