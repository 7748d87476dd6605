"""The trainer's side of online generation: receive SASI into the ring, pair from it.

Pairing order for each sample of a micro-batch (each outcome counted):
1. `ring_hit`   a live SASI of the sample's own image (look-ahead makes these);
2. `pool_draw`  a live SASI of another image: the sample becomes (real image of *that*
                index, its SASI) — a correct positive pair, just not the planned image;
3. `store`      a SASI of the sample's image from the store (when `store.path` is set);
4. `fallback`   none: the pair builder uses a classic second real view.

The trainer never waits for a producer: before each micro-step it takes whatever has
arrived (transport.py's sentinel polling) and puts it in the ring; SASI the ring refuses
(every slot unused and young: backpressure) wait in a small backlog, and no new message
is taken while the backlog is non-empty, so the producers run out of credits and pause.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from sasi_online.data.sasi_source import HIT, MISSING, SasiHit
from sasi_online.utils import derive_seed

from .ring import RingPool

RING_HIT, POOL_DRAW, STORE, FALLBACK = "ring_hit", "pool_draw", "store", "fallback"
OUTCOMES = (RING_HIT, POOL_DRAW, STORE, FALLBACK)
RING_STATE = "ring_rank{rank}.pt"
SUMMARY_FILE = "online_summary.json"


class RingSource:
    """`SasiSource` over a RingPool (and optionally a store behind it)."""

    def __init__(self, ring: RingPool, store_source: Any = None, as_numpy: bool = False,
                 on_device: bool = False):
        self.ring = ring
        self.store_source = store_source
        self.as_numpy = as_numpy  # the DALI augmenter takes host arrays
        # The pair builder assembles each view column on the host, mixing real images and SASI,
        # so ring images go to the host unless the augmenter works on the ring's device.
        self.on_device = on_device
        self.step = 0  # the trainer's micro-step (ring ages count in these)
        self.counts: Counter = Counter()
        self._resolved: Optional[tuple[list[int], list[SasiHit]]] = None

    def _image(self, slot: int) -> Any:
        img = self.ring.image(slot)
        img = img.clone() if self.on_device or img.device.type == "cpu" else img.cpu()  # a copy: slots get reused
        return img.cpu().numpy() if self.as_numpy else img

    def _ring_hits(self, indices: list[int], rng: np.random.Generator) -> list[Optional[SasiHit]]:
        out: list[Optional[SasiHit]] = []
        for h in self.ring.lookup(indices, self.step, rng):
            out.append(None if h is None else SasiHit(self._image(h.slot), HIT, h.variant))
        return out

    def _from_store(self, index: int, rng: np.random.Generator) -> SasiHit:
        if self.store_source is not None:
            hit = self.store_source.get([index], rng)[0]
            if hit.outcome == HIT:
                self.counts[STORE] += 1
                return hit
        self.counts[FALLBACK] += 1
        return SasiHit(None, MISSING)

    def resolve(self, indices: list[int], rng: np.random.Generator) -> tuple[list[int], list[SasiHit]]:
        """(real image index per sample, its SASI) in the pairing order above."""
        indices = [int(i) for i in indices]
        hits = self._ring_hits(indices, rng)
        self.counts[RING_HIT] += sum(h is not None for h in hits)
        reals = list(indices)
        misses = [k for k, h in enumerate(hits) if h is None]
        for k, d in zip(misses, self.ring.draw(len(misses), self.step, rng, exclude=set(indices))):
            reals[k] = d.image_index
            hits[k] = SasiHit(self._image(d.slot), HIT, d.variant)
            self.counts[POOL_DRAW] += 1
        for k, h in enumerate(hits):
            if h is None:
                hits[k] = self._from_store(indices[k], rng)
        self._resolved = (reals, hits)
        return reals, hits

    def get(self, indices: list[int], rng: np.random.Generator) -> list[SasiHit]:
        """The SasiSource interface. After `resolve` for these indices it returns that
        resolution; alone it cannot swap real images, so it skips pool draws."""
        indices = [int(i) for i in indices]
        if self._resolved is not None and self._resolved[0] == indices:
            return list(self._resolved[1])
        hits = self._ring_hits(indices, rng)
        self.counts[RING_HIT] += sum(h is not None for h in hits)
        return [h if h is not None else self._from_store(i, rng) for h, i in zip(hits, indices)]

    def state_dict(self) -> dict:
        # Each trainer's ring is saved in its own file (OnlineTrainer.save): DeepSpeed keeps
        # the client state of the first trainer only.
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class OnlineMicroBatches:
    """Micro-step m → views, like train.MicroBatches, but pairing goes first: a pool draw
    changes which real image a sample uses."""

    def __init__(self, dataset, sampler, builder, seed: int, trainer_rank: int, source: RingSource):
        self.dataset, self.sampler, self.builder = dataset, sampler, builder
        self.seed, self.rank, self.source = seed, trainer_rank, source

    def __call__(self, m: int):
        indices = self.sampler.indices(m, self.rank)
        rng = np.random.default_rng(derive_seed(self.seed, self.rank, m, "pairs"))
        reals, _ = self.source.resolve(indices, rng)
        images = [np.asarray(self.dataset[i].image) for i in reals]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.rank, m, "augment"))
            return self.builder.build(images, reals, rng)


def trainer_device() -> torch.device:
    """The device DeepSpeed gives this trainer: its local GPU, else the CPU."""
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def trainer_only_barriers(trainer_group: Any):
    """Confine DeepSpeed's world barriers to the trainers while they save.

    `engine.save_checkpoint` calls `deepspeed.comm.barrier()` without a group, i.e. on every
    rank, producers included, which are busy generating. The save touches trainer state only,
    so its barriers are pointed at the trainer group for the duration (ZeRO 0-2 measured).
    """
    import deepspeed.comm as ds_comm

    original = ds_comm.barrier

    def barrier(group=None, *args, **kwargs):
        return original(trainer_group if group is None else group, *args, **kwargs)

    ds_comm.barrier = barrier
    try:
        yield
    finally:
        ds_comm.barrier = original


class OnlineTrainer:
    """Ring + receiver + coordination on one trainer rank."""

    def __init__(self, cfg: Any, roles: Any, dataset_size: int, device: Any = None, as_numpy: bool = False):
        from .metrics import OnlineMetrics
        from .protocol import Coordination
        from .transport import SasiReceiver, default_store

        from .settings import check_online_config

        check_online_config(cfg)
        o = cfg.online
        res = cfg.generation.resolution
        self.cfg, self.roles = cfg, roles
        self.rank = roles.rank
        self.is_main = roles.trainer_rank == 0
        self.device = torch.device(device) if device is not None else trainer_device()
        self.ring = RingPool(o.ring_slots, (res, res, 3), self.device, max_reuse=o.max_reuse, max_age=o.max_age)
        store_source = None
        from sasi_online.data.store import HEADER

        if cfg.store.path and Path(cfg.store.path, HEADER).is_file() and not cfg.store.write_online:
            from sasi_online.data.sasi_source import StoreSource
            from sasi_online.data.store import SasiStore

            store_source = StoreSource(SasiStore.open(cfg.store.path))
        self.source = RingSource(self.ring, store_source, as_numpy=as_numpy)
        self.coord = Coordination(default_store(), roles.num_trainers)
        recv_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.receiver = SasiReceiver(roles.producer_ranks, o.send_batch, (res, res, 3), roles.transport_group,
                                     buffers=o.credits, store=self.coord.store, device=recv_device)
        self.backlog: list[tuple[int, int, torch.Tensor]] = []
        self.per_image = np.zeros(dataset_size, dtype=np.int64)  # SASI received per image, this trainer
        self.counts: Counter = Counter()  # received, arrived_after_end
        self.poll_s = 0.0
        self.saves = 0
        self.finished = False
        self.started = False
        self.start_wait_s = 0.0
        self.metrics = OnlineMetrics(self, roles.trainer_group)
        print(f"online: trainer rank {self.rank} ring of {o.ring_slots} slots x {res}x{res}x3 uint8 = "
              f"{self.ring.nbytes / 2**20:.1f} MiB on {self.device}, fixed for the run", flush=True)

    def micro_batches(self, dataset, sampler, builder, seed: int, trainer_rank: int) -> "OnlineMicroBatches":
        return OnlineMicroBatches(dataset, sampler, builder, seed, trainer_rank, self.source)

    # ------------------------------------------------------------------ each micro-step
    def _ingest(self, batch, step: int) -> None:
        for idx, var, img in zip(batch.indices, batch.variants, batch.images):
            self.per_image[idx] += 1
            self.counts["received"] += 1
            self.backlog.append((int(idx), int(var), img))
        self._place(step)

    def _place(self, step: int) -> None:
        keep = []
        for idx, var, img in self.backlog:
            if keep or not self.ring.put(idx, var, img.to(self.device), step):
                keep.append((idx, var, img))  # FIFO: later arrivals wait behind a refused one
        self.backlog = keep

    def wait_for_start(self, m: int) -> None:
        """Once, before the first step: wait for `online.start_sasi` SASI (producers load models)."""
        if self.started:
            return
        if self.is_main:
            self.coord.publish_step(m)
        t0 = time.perf_counter()
        want = min(self.cfg.online.start_sasi, self.ring.slots)
        while int((self.ring.index >= 0).sum()) < want and not self.receiver.all_stopped:
            for batch in self.receiver.poll():
                self._ingest(batch, m)
            time.sleep(0.01)
        self.start_wait_s = time.perf_counter() - t0
        self.started = True

    def before_micro_step(self, m: int) -> None:
        if self.is_main:
            self.coord.publish_step(m)
        if not self.started:
            self.wait_for_start(m)
        t0 = time.perf_counter()
        self.source.step = m
        self._place(m)
        if not self.backlog:  # backpressure: take nothing new while the ring refuses
            for batch in self.receiver.poll():
                self._ingest(batch, m)
        self.poll_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"ring": self.ring.state_dict(), "source_counts": dict(self.source.counts),
                "counts": dict(self.counts), "per_image": torch.from_numpy(self.per_image.copy()),
                "backlog": [{"index": i, "variant": v, "image": im.cpu()} for i, v, im in self.backlog]}

    def save(self, ckpt_dir: Path, step: int, micro_step: int, save_fn) -> None:
        """A quiet checkpoint: take every message producers sent before it, then save."""
        from sasi_online.training.checkpoint import tag_of

        self.saves += 1
        k = self.coord.request_save(step) if self.is_main else self.saves
        for p in self.roles.producer_ranks:
            target = self.coord.sent_by(k, p).get(self.rank, 0)
            while self.receiver.messages[p] < target:
                for batch in self.receiver.poll():
                    self._ingest(batch, micro_step)
                time.sleep(0.0005)
        folder = ckpt_dir / tag_of(step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RING_STATE.format(rank=self.roles.trainer_rank)
        torch.save(self._state(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        with trainer_only_barriers(self.roles.trainer_group):
            save_fn()
        if self.is_main:
            self.coord.mark_saved(k)

    def load(self, ckpt_dir: Path, step: int) -> None:
        from sasi_online.errors import UserInputError
        from sasi_online.training.checkpoint import tag_of

        path = ckpt_dir / tag_of(step) / RING_STATE.format(rank=self.roles.trainer_rank)
        if not path.is_file():
            raise UserInputError(f"checkpoint '{path.parent}' has no ring state ({path.name}); it was not "
                                 f"written by an online run with this many trainers: resume with the same "
                                 f"online.producers and number of ranks, or use a new train.out")
        state = torch.load(path, weights_only=True)
        self.ring.load_state_dict(state["ring"])
        self.source.counts = Counter(state["source_counts"])
        self.counts = Counter(state["counts"])
        per_image = state["per_image"].numpy()
        if per_image.shape != self.per_image.shape:
            raise UserInputError(f"ring state in '{path}' is for {per_image.shape[0]} images, the dataset has "
                                 f"{self.per_image.shape[0]}: resume with the same data settings")
        self.per_image = per_image.copy()
        self.backlog = [(int(b["index"]), int(b["variant"]), b["image"]) for b in state["backlog"]]
        self.metrics.resumed(step * self.cfg.train.grad_accum)

    # ------------------------------------------------------------------ end
    def summary(self, module: Any = None) -> dict:
        """Run totals over all trainers (collective on the trainer group)."""
        local = [self.source.counts[k] for k in OUTCOMES] + [self.counts["received"], len(self.backlog)]
        tot = torch.tensor(local, dtype=torch.float64)
        dist.all_reduce(tot, group=self.roles.trainer_group)
        out = {"outcomes": {k: int(v) for k, v in zip(OUTCOMES, tot[:4].tolist())},
               "sasi_received": int(tot[4]), "backlog": int(tot[5]),
               "producers": [self.coord.producer_stats(i) for i in range(len(self.roles.producer_ranks))]}
        if module is not None:
            out["replica_max_abs_diff"] = replica_divergence(module, self.roles.trainer_group,
                                                             self.roles.trainer_ranks[0])
        return out

    def finish(self, out_dir: Optional[Path] = None, module: Any = None) -> dict:
        """Tell producers we are done, take every message up to their STOP, meet them at the end.

        The first trainer (`out_dir` given) writes online_summary.json and the ring and
        throughput plots there."""
        if self.finished:
            return {}
        summary = self.summary(module)
        if out_dir is not None:
            from sasi_online.utils import atomic_write_json

            atomic_write_json(Path(out_dir) / SUMMARY_FILE, summary)
            if self.cfg.online.plots:
                from .plots import plot_online_run

                plot_online_run(out_dir)
        self.finished = True
        self.coord.trainer_finished()
        while not self.receiver.all_stopped:
            for batch in self.receiver.poll():
                self.counts["arrived_after_end"] += len(batch.indices)
            time.sleep(0.001)
        dist.barrier(group=self.roles.transport_group)
        return summary


def replica_divergence(module: torch.nn.Module, group: Any, src: int) -> float:
    """Largest |parameter - the first trainer's| over all trainers: data-parallel replicas
    must agree; a drift means the ring or a hook changed the step on one trainer only."""
    worst = torch.zeros(1, dtype=torch.float64)
    for p in module.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=src, group=group)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().to(torch.float64).cpu().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)
