"""The trainer's side of online generation: receive SASI into the ring, pair from it.

Pairing order for each sample of a micro-batch (each outcome counted):
1. `ring_hit`   a live SASI of the sample's own image (look-ahead makes these);
2. `pool_draw`  a live SASI of another image: the sample becomes (real image of *that*
                index, its SASI) — a correct positive pair, just not the planned image;
                the slot holds that real image too (online/slots.py), so it needs no decode;
3. `store`      a SASI of the sample's image from the store (when `store.path` is set);
4. `fallback`   none: the pair builder uses a classic second real view.

The trainer never waits for a producer: before each micro-step it takes whatever has
arrived (transport.py's sentinel polling) and puts it in the ring; SASI the ring refuses
(every slot unused and young: backpressure) wait in a small backlog, and no new message
is taken while the backlog is non-empty, so the producers run out of credits and pause.
Only the samples that take a SASI are resolved (`rows`: the `mix` mode's synthetic half).
Views: `OnlineMicroBatches` builds pairs on the host here (augment.backend=dali);
device_views.py makes ring slots into views on the trainer's device (torchvision).
A checkpoint holds metadata and counters only; a resume refills from the store behind the
run (`refill_from_store`) and from the producers. Where the SASI come from is the trainer's feed: producer ranks over the transport
(feeds.LaunchedFeed, online.mode=launched) or a producer in this process
(colocated.ColocatedFeed, online.mode=colocated). Bookkeeping collectives (metrics, the
summary) run on the trainers' gloo control group (groups.py).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from sasi_online.data.sasi_source import HIT, MISSING, SasiHit, sasi_pair_rate
from sasi_online.utils import derive_seed

from .groups import trainer_device
from .health import SupplyWatch, supply_problem
from .ring import RingPool, to_device_index
from .slots import REAL, SASI, make_slots, slot_shape

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
        # After `resolve`: per sample, the real image a pool draw brought from its slot (no
        # host decode), or None where the sample's real image is the dataset's.
        self.real_images: list[Any] = []

    def _images(self, slots: list[int], row: int = SASI) -> list[Any]:
        """Copies of row `row` (SASI or REAL) of these slots (slots get reused), on the host
        unless `on_device`: one gather on the ring's device and one copy for the batch."""
        if not slots:
            return []
        stacked = self.ring.images[to_device_index(slots, self.ring.images.device), row]  # a gather: a copy
        if not self.on_device:
            stacked = stacked.cpu()
        if self.as_numpy:
            return list(stacked.cpu().numpy())
        return list(stacked.unbind(0))

    def _ring_slots(self, indices: list[int], rng: np.random.Generator) -> list[Optional[tuple[int, int]]]:
        """(slot, variant) of a live SASI of each sample's own image, or None."""
        return [None if h is None else (h.slot, h.variant) for h in self.ring.lookup(indices, self.step, rng)]

    def _hits(self, found: list[Optional[tuple[int, int]]]) -> list[Optional[SasiHit]]:
        slots = [f[0] for f in found if f is not None]
        images = iter(self._images(slots))
        return [None if f is None else SasiHit(next(images), HIT, f[1]) for f in found]

    def _from_store(self, index: int, rng: np.random.Generator) -> SasiHit:
        if self.store_source is not None:
            hit = self.store_source.get([index], rng)[0]
            if hit.outcome == HIT:
                self.counts[STORE] += 1
                return hit
        self.counts[FALLBACK] += 1
        return SasiHit(None, MISSING)

    def resolve(self, indices: list[int], rng: np.random.Generator,
                rows: Optional[np.ndarray] = None) -> tuple[list[int], list[Optional[SasiHit]]]:
        """(real image index per sample, its SASI) in the pairing order above.

        `rows` (a bool mask, `PairBuilder.sasi_rows`): only these samples take a SASI (the
        `mix` mode's synthetic half); the others keep their real image and are neither
        looked up, drawn for, nor counted. Draws still exclude every image of the batch.
        `get` afterwards returns the resolution of the same subset."""
        indices = [int(i) for i in indices]
        if rows is not None and len(rows) != len(indices):
            raise ValueError(f"rows mask of {len(rows)} for {len(indices)} samples")
        picked = list(range(len(indices))) if rows is None else np.flatnonzero(np.asarray(rows, bool)).tolist()
        sub = [indices[k] for k in picked]
        found = self._ring_slots(sub, rng)
        self.counts[RING_HIT] += sum(f is not None for f in found)
        reals, sub_reals = list(indices), list(sub)
        misses = [j for j, f in enumerate(found) if f is None]
        drawn = self.ring.draw(len(misses), self.step, rng, exclude=set(indices))
        self.real_images = [None] * len(indices)
        for j, d, im in zip(misses, drawn, self._images([d.slot for d in drawn], REAL)):
            sub_reals[j] = reals[picked[j]] = d.image_index
            self.real_images[picked[j]] = im  # the slot holds the draw's real image
            found[j] = (d.slot, d.variant)
            self.counts[POOL_DRAW] += 1
        hits = self._hits(found)
        for j, h in enumerate(hits):
            if h is None:
                hits[j] = self._from_store(sub[j], rng)
        self._resolved = (sub_reals, hits)
        full: list[Optional[SasiHit]] = [None] * len(indices)  # None: a row that takes no SASI
        for j, k in enumerate(picked):
            full[k] = hits[j]
        return reals, full

    def get(self, indices: list[int], rng: np.random.Generator) -> list[SasiHit]:
        """The SasiSource interface. After `resolve` for these indices (the rows it resolved,
        in order, with pool draws' real images) it returns that resolution; alone it cannot
        swap real images, so it skips pool draws."""
        indices = [int(i) for i in indices]
        if self._resolved is not None and self._resolved[0] == indices:
            return list(self._resolved[1])
        hits = self._hits(self._ring_slots(indices, rng))
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
        rows = self.builder.sasi_rows(len(indices), rng)  # mix: only the synthetic half asks
        reals, _ = self.source.resolve(indices, rng, rows)
        images = [np.asarray(self.dataset[i].image) if ring_real is None else ring_real
                  for i, ring_real in zip(reals, self.source.real_images)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.rank, m, "augment"))
            return self.builder.build(images, reals, rng, sasi_rows=rows)


class OnlineTrainer:
    """Ring + feed (launched: producer ranks over gloo; colocated: a producer in this
    process) + bookkeeping on one trainer rank."""

    def __init__(self, cfg: Any, roles: Any, dataset: Any, sampler: Any, device: Any = None,
                 as_numpy: bool = False):
        from .metrics import OnlineMetrics
        from .protocol import Coordination
        from .settings import check_online_config
        from .transport import default_store

        check_online_config(cfg)
        o = cfg.online
        shape = slot_shape(cfg)  # [SASI, its real image] at the trainer's side
        self.cfg, self.roles, self.dataset = cfg, roles, dataset
        self.rank = roles.rank
        self.is_main = roles.trainer_rank == 0
        self.device = torch.device(device) if device is not None else trainer_device()
        self.ring = RingPool(o.ring_slots, shape, self.device, max_reuse=o.max_reuse, max_age=o.max_age,
                             dataset_size=len(dataset))
        self.source = RingSource(self.ring, self._store_source(cfg), as_numpy=as_numpy)
        self.coord = Coordination(default_store(), roles.num_trainers)
        if o.mode == "colocated":
            from .colocated import ColocatedFeed

            self.feed = ColocatedFeed(cfg, roles, dataset, sampler, self.coord, self.device)
        else:
            from .feeds import LaunchedFeed

            self.feed = LaunchedFeed(cfg, roles, self.coord, pin=self.device.type == "cuda")
        self.backlog: list[tuple[int, int, torch.Tensor]] = []
        self.per_image = np.zeros(len(dataset), dtype=np.int64)  # SASI received per image, this trainer
        self.counts: Counter = Counter()  # received, arrived_after_end
        self.poll_s = 0.0
        self.saves = 0
        self.finished = False
        self.started = False
        self.start_wait_s = 0.0
        self.watch = SupplyWatch(o)
        self.failure = ""  # why the run stopped for want of SASI (health.py), "" when it did not
        self.metrics = OnlineMetrics(self)
        side = shape[1]
        print(f"online ({o.mode}): trainer rank {self.rank} ring of {o.ring_slots} slots x (SASI + real image) "
              f"{side}x{side}x3 uint8 = {self.ring.nbytes / 2**20:.1f} MiB on {self.device}, fixed for the run",
              flush=True)

    @staticmethod
    def _store_source(cfg: Any) -> Any:
        from sasi_online.data.store import HEADER

        if cfg.store.path and Path(cfg.store.path, HEADER).is_file() and not cfg.store.write_online:
            from sasi_online.data.sasi_source import StoreSource
            from sasi_online.data.store import SasiStore

            return StoreSource(SasiStore.open(cfg.store.path))
        return None

    def micro_batches(self, dataset, sampler, builder, seed: int, trainer_rank: int) -> "OnlineMicroBatches":
        return OnlineMicroBatches(dataset, sampler, builder, seed, trainer_rank, self.source)

    def producer_stats(self) -> list[dict]:
        return self.feed.producer_stats()

    # ------------------------------------------------------------------ each micro-step
    def _ingest(self, batch, step: int) -> None:
        for idx, var, img in zip(batch.indices, batch.variants, batch.images):
            self.per_image[idx] += 1
            self.counts["received"] += 1
            self.backlog.append((int(idx), int(var), img))
        self._place(step)

    def _place(self, step: int) -> None:
        keep = []
        for idx, var, img in self.backlog:  # host images (pinned on a GPU) copy in with non_blocking
            if keep or not self.ring.put(idx, var, img, step):
                keep.append((idx, var, img))  # FIFO: later arrivals wait behind a refused one
        self.backlog = keep

    def wait_for_start(self, m: int) -> None:
        """Once, before the first step: wait for `online.start_sasi` SASI (producers load models)."""
        if self.started:
            return
        if self.is_main:
            self.coord.publish_step(m)
        t0 = time.perf_counter()
        self.watch.start(int(self.counts["received"]))
        self.feed.start()
        want = min(self.cfg.online.start_sasi, self.ring.slots)
        next_look = 0.0
        while int((self.ring.index >= 0).sum()) < want and not self.feed.exhausted:
            got = self.feed.poll(m, start=True)
            for batch in got:
                self._ingest(batch, m)
            if not got and self.feed.idle:
                if self.cfg.online.mode == "colocated":
                    break  # nothing more to plan before the first step
                time.sleep(0.01)
                if time.perf_counter() >= next_look:  # producer stats: one store read a second
                    next_look = time.perf_counter() + 1.0
                    self.watch.note_loaded(self.feed.models_loaded())
                    if self.watch.timed_out(int(self.counts["received"])):
                        break  # the first log step stops the run (health.py)
        self.start_wait_s = time.perf_counter() - t0
        self.started = True

    def supply_problem(self, final: bool) -> Optional[str]:
        """Collective (control group): why this run gets no SASI, or None (health.py)."""
        return supply_problem(self, final)

    def fail(self, message: str) -> None:
        """Stop for want of SASI: recorded in the summary, published for the producers."""
        self.failure = message
        if self.is_main:
            self.coord.publish_failure(message)

    def before_micro_step(self, m: int) -> None:
        if self.is_main:
            self.coord.publish_step(m)
        if not self.started:
            self.wait_for_start(m)
        t0 = time.perf_counter()
        self.source.step = m
        self._place(m)
        if not self.backlog:  # backpressure: take nothing new while the ring refuses
            for batch in self.feed.poll(m):
                self._ingest(batch, m)
        self.poll_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ checkpoints
    def _state(self, micro_step: int) -> dict:
        """Metadata and counters only: no pixels of the ring or of the backlog (a resume
        counts them as dropped and refills from the store and the producers)."""
        return {"ring": self.ring.state_dict(), "source_counts": dict(self.source.counts),
                "counts": dict(self.counts), "per_image": torch.from_numpy(self.per_image.copy()),
                "backlog": {"index": torch.tensor([i for i, _, _ in self.backlog], dtype=torch.int64),
                            "variant": torch.tensor([v for _, v, _ in self.backlog], dtype=torch.int64),
                            "step": micro_step}}

    def save(self, ckpt_dir: Path, step: int, micro_step: int, save_fn) -> None:
        """A quiet checkpoint: take every SASI made before it, then save (every trainer)."""
        from sasi_online.training.checkpoint import tag_of

        self.saves += 1
        k = self.coord.request_save(step) if self.is_main and self.roles.num_producers else self.saves
        self.feed.quiet_point(k, lambda batch: self._ingest(batch, micro_step))
        folder = ckpt_dir / tag_of(step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RING_STATE.format(rank=self.roles.trainer_rank)
        torch.save(self._state(micro_step), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        self.feed.save_state(folder)
        save_fn()  # checkpoint.save: DeepSpeed's barriers on the control group
        if self.is_main and self.roles.num_producers:
            self.coord.mark_saved(k)

    def load(self, ckpt_dir: Path, step: int) -> None:
        from sasi_online.errors import UserInputError
        from sasi_online.training.checkpoint import tag_of

        path = ckpt_dir / tag_of(step) / RING_STATE.format(rank=self.roles.trainer_rank)
        if not path.is_file():
            raise UserInputError(f"checkpoint '{path.parent}' has no ring state ({path.name}); it was not "
                                 f"written by an online run with this many trainers: resume with the same "
                                 f"online.mode, online.producers and number of ranks, or use a new train.out")
        state = torch.load(path, weights_only=True)
        self.ring.load_state_dict(state["ring"])
        self.source.counts = Counter(state["source_counts"])
        self.counts = Counter(state["counts"])
        per_image = state["per_image"].numpy()
        if per_image.shape != self.per_image.shape:
            raise UserInputError(f"ring state in '{path}' is for {per_image.shape[0]} images, the dataset has "
                                 f"{self.per_image.shape[0]}: resume with the same data settings")
        self.per_image = per_image.copy()
        b = state["backlog"]
        if isinstance(b, list):  # written before checkpoints dropped the backlog's pixels
            b = {"index": torch.tensor([int(x["index"]) for x in b], dtype=torch.int64),
                 "variant": torch.tensor([int(x["variant"]) for x in b], dtype=torch.int64),
                 "step": step * self.cfg.train.grad_accum}
        self.ring.drop_pending(b["index"].tolist(), b["variant"].tolist(), int(b["step"]))
        self.backlog = []
        self.feed.load_state(path.parent)
        self.refill_from_store(step * self.cfg.train.grad_accum)
        self.metrics.resumed(step * self.cfg.train.grad_accum)

    def refill_from_store(self, micro_step: int) -> int:
        """After a resume: put back the dropped SASI that the store behind the run holds
        (store.write_online), resized to the slots with their real images. Producers refill
        the rest. Returns how many came back."""
        from sasi_online.data.store import HEADER

        s = self.cfg.store
        if not (s.write_online and s.path and Path(s.path, HEADER).is_file()) or not self.ring.dropped_entries["index"].size:
            return 0
        from sasi_online.data.store import SasiStore
        from sasi_online.errors import CorruptImageError

        store, side = SasiStore.open(s.path), self.ring.image_shape[1]

        def load(index: int, variant: int) -> Optional[torch.Tensor]:
            try:
                image = store.get(index, variant)
            except CorruptImageError:
                return None
            if image is None:
                return None
            return make_slots(np.asarray(image)[None], [self.dataset[index].image], side)[0]

        done = self.ring.refill(load, micro_step)
        print(f"online: trainer rank {self.rank} refilled {done} of the ring's SASI from store '{s.path}' "
              f"({self.ring.dropped_at_resume} dropped at resume in all)", flush=True)
        return done

    # ------------------------------------------------------------------ end
    def summary(self, module: Any = None) -> dict:
        """Run totals over all trainers (collective on the control group)."""
        from .groups import control_reduce

        local = [self.source.counts[k] for k in OUTCOMES] + [self.counts["received"], len(self.backlog)]
        tot = control_reduce(local, "sum")
        outcomes = {k: int(v) for k, v in zip(OUTCOMES, tot[:4].tolist())}
        out = {"mode": self.cfg.online.mode, "outcomes": outcomes,
               "sasi_pair_rate": sasi_pair_rate(outcomes) or 0.0,
               "sasi_received": int(tot[4]), "backlog": int(tot[5]), "producers": self.producer_stats(),
               "failure": self.failure}
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
        self.feed.publish_final()  # a co-located producer's last stats, before the summary reads them
        summary = self.summary(module)
        if out_dir is not None:
            from sasi_online.utils import atomic_write_json

            atomic_write_json(Path(out_dir) / SUMMARY_FILE, summary)
            if self.cfg.online.plots:
                from .plots import plot_online_run

                plot_online_run(out_dir)
        self.finished = True
        self.coord.trainer_finished()
        self.feed.finish(lambda batch: self.counts.update(arrived_after_end=len(batch.indices)))
        self.feed.meet_at_end()
        return summary


def replica_divergence(module: torch.nn.Module, group: Any, src: int) -> float:
    """Largest |parameter - the first trainer's| over all trainers: data-parallel replicas
    must agree; a drift means the ring or a hook changed the step on one trainer only.
    Parameters travel on the model plane (their device); the maximum on the control plane."""
    from .groups import control_reduce

    worst = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    for p in module.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=src, group=group)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().to(torch.float64))
    return float(control_reduce([float(worst.cpu())], "max")[0])
