"""The SA-CL trainer: (real, SASI) pairs → method → DeepSpeed engine.

    deepspeed sasi_online/train.py --config configs/tiny_cpu.yaml [section.key=value ...]
    python sasi_online/train.py --config ...        (one process; same code path)
    sasi train --config ...                         (the same `train(cfg)`)

Every random choice of a micro-step (sampled indices, SASI variant, augmentation draws,
the method's own randomness) is seeded from (train.seed, trainer rank, micro-step), and
checkpoints hold model, optimizer, scheduler, queues, RNG states and the step: a resumed
run continues exactly where the interrupted one would have (torchvision path).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (by a launcher): Python put this file's folder first on the path,
    # where `ssl/` would shadow the standard library's ssl. Put the repository there instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
import functools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from sasi_online.config import Config, load_config, save_config  # noqa: E402
from sasi_online.errors import UserInputError  # noqa: E402
from sasi_online.utils import derive_seed, limit_threads  # noqa: E402


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


@dataclass
class TrainResult:
    out: Path
    step: int  # optimizer steps done
    losses: dict = field(default_factory=dict)  # step -> mean loss over trainers
    last_eval: dict = field(default_factory=dict)  # knn_acc, feature_std
    sasi_outcomes: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks
def validate(cfg: Config, num_trainers: int = 1) -> None:
    """Refuse impossible settings before any model is built or data is read."""
    from sasi_online.data.augment import load_recipe
    from sasi_online.data.pairs import check_pair_mode

    t = cfg.train
    check_pair_mode(t.pair_mode, cfg.store.path is not None or cfg.online.producers > 0)
    for name in ("batch_size", "steps", "log_every", "ckpt_every", "knn_every"):
        if getattr(t, name) < 1:
            raise UserInputError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    load_recipe(cfg.augment.recipe)
    if cfg.online.producers > 0 and t.num_workers > 0:
        raise UserInputError("train.num_workers must be 0 with online.producers > 0: SASI arrive in the "
                             "trainer process (the ring); set train.num_workers=0")
    if cfg.augment.backend not in ("torchvision", "dali"):
        raise UserInputError(f"augment.backend must be torchvision or dali, got '{cfg.augment.backend}'")
    from sasi_online.training.engine import deepspeed_config

    deepspeed_config(cfg, t.batch_size, num_trainers)  # zero_stage, precision, grad_accum
    if cfg.online.producers > 0:
        from sasi_online.online.settings import check_online_config

        check_online_config(cfg)
    from sasi_online.ssl import METHODS

    if cfg.method.name in METHODS:  # e.g. MoCo-v2's queue must hold whole global batches
        try:
            METHODS[cfg.method.name].validate_global_batch(cfg.method, t.batch_size * num_trainers)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None


def open_sasi_source(cfg: Config, dataset) -> Any:
    """The hook for SASI: a store reader offline. An online ring source plugs in here."""
    from sasi_online.data.pairs import NEEDS_SASI
    from sasi_online.data.sasi_source import StoreSource

    if cfg.train.pair_mode not in NEEDS_SASI:
        return None
    if cfg.online.producers > 0:
        return None  # online: the trainer builds a RingSource (online/ring_source.py)
    from sasi_online.data.store import SasiStore

    store = SasiStore.open(cfg.store.path)
    _check_store_matches(store, dataset, cfg)
    return StoreSource(store, vp_kind="noise" if cfg.train.pair_mode == "direct" else None)


def _check_store_matches(store, dataset, cfg: Config) -> None:
    """A store made for another dataset would pair images with strangers' SASI."""
    made_for = (getattr(store, "header", None) or {}).get("dataset") or {}
    name, split, size = made_for.get("name"), made_for.get("split"), made_for.get("size")
    problems = []
    if name is not None and str(name).lower() != str(dataset.name).lower():
        problems.append(f"dataset '{name}' (data.name is '{dataset.name}')")
    if split is not None and split != dataset.split:
        problems.append(f"split '{split}' (training reads '{dataset.split}')")
    # indices are a prefix under data.limit: a store of the full set serves a limited one
    if size is not None and int(size) < len(dataset):
        problems.append(f"{size} images (the dataset has {len(dataset)})")
    if problems:
        raise UserInputError(
            f"store '{cfg.store.path}' does not match the training data: it was made for "
            f"{'; '.join(problems)}. Point store.path at a store generated for this dataset, "
            f"or change data.* to the store's dataset")


# ----------------------------------------------------------------------------- batches
class MicroBatches:
    """Micro-step m → its views, a pure function of (seed, trainer rank, m)."""

    def __init__(self, dataset, sampler, builder, seed: int, trainer_rank: int):
        self.dataset, self.sampler, self.builder = dataset, sampler, builder
        self.seed, self.rank = seed, trainer_rank

    def __call__(self, m: int):
        indices = self.sampler.indices(m, self.rank)
        images = [np.asarray(self.dataset[i].image) for i in indices]
        rng = np.random.default_rng(derive_seed(self.seed, self.rank, m, "pairs"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.rank, m, "augment"))
            return self.builder.build(images, indices, rng)


class _MicroBatchDataset(torch.utils.data.Dataset):
    def __init__(self, make: MicroBatches, first: int, last: int):
        self.make, self.first, self.last = make, first, last

    def __len__(self):
        return self.last - self.first

    def __getitem__(self, i):
        b = self.make(self.first + i)
        return b.views, dict(b.outcomes)


def _iterate(make: MicroBatches, first: int, last: int, num_workers: int):
    if num_workers <= 0:
        for m in range(first, last):
            b = make(m)
            yield b.views, dict(b.outcomes)
        return
    loader = torch.utils.data.DataLoader(_MicroBatchDataset(make, first, last), batch_size=None,
                                         shuffle=False, num_workers=num_workers,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    yield from loader


# ----------------------------------------------------------------------------- trainer
def _loss_of(engine, views, pair_mode: str, step: int, total: int) -> dict:
    if pair_mode == "three_flow":  # losses on (1,2) and (1,3), averaged
        a = engine([views[0], views[1]], step, total)
        b = engine([views[0], views[2]] + list(views[3:]), step, total)
        return {k: (a[k] + b[k]) / 2 for k in a if k in b}
    return engine(list(views), step, total)


def _all_finite(loss: torch.Tensor, group) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(bad, group=group)
    return bad.item() == 0


def _mean_over(values: list[float], group) -> float:
    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return float(t[0] / max(t[1], 1))


def train(cfg: Config, *, stop_at: Optional[int] = None,
          step_callback: Optional[Callable[[int, Any], None]] = None,
          method_factory: Optional[Callable[[Any, int], Any]] = None) -> TrainResult:
    """Train `cfg.train.steps` optimizer steps (resuming from `train.out` if it holds a
    checkpoint). `stop_at` ends the run early after that step's checkpoint, as a
    pre-emption would; `step_callback(step, method)` runs after each optimizer step;
    `method_factory(cfg.method, global_batch)` replaces `ssl.build_method` (e.g. a method
    on a custom backbone)."""
    limit_threads()
    from sasi_online.training.engine import destroy_process_group, init_process_group

    validate(cfg, num_trainers=1)  # before the process group: cheap errors first
    created_group = init_process_group()
    try:
        from sasi_online.online.roles import setup_roles

        roles = setup_roles(cfg.online.producers)
        validate(cfg, num_trainers=roles.num_trainers)
        if roles.is_producer:
            from sasi_online.online.producer import run_producer

            run_producer(cfg, roles)
            return TrainResult(out=Path(cfg.train.out), step=0)
        return _train_on_trainer(cfg, roles, stop_at, step_callback, method_factory)
    finally:
        if created_group:
            destroy_process_group()


def _train_on_trainer(cfg, roles, stop_at, step_callback, method_factory):
    from tqdm import tqdm

    from sasi_online.data.augment import build_augmenter
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.pairs import NEEDS_SASI, PairBuilder
    from sasi_online.data.sampler import StepSampler
    from sasi_online.ssl import build_method
    from sasi_online.ssl import distributed as ssl_dist
    from sasi_online.training import checkpoint as ckpt
    from sasi_online.training.engine import build_engine, deepspeed_config
    from sasi_online.training.knn_monitor import KnnMonitor
    from sasi_online.training.metrics import MetricsLogger
    from sasi_online.training.optim import build_optimizer
    from sasi_online.training.schedule import build_scheduler

    t = cfg.train
    rank, n_trainers = roles.trainer_rank, roles.num_trainers
    group = roles.trainer_group
    ssl_dist.set_group(group)
    out = Path(t.out)
    ckpt_dir = out / "checkpoints"
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    found = ckpt.latest(ckpt_dir) if t.resume else None
    if found is not None:
        ckpt.check_config(ckpt_dir, cfg)  # before any work

    dataset = build_dataset(cfg.data, "train")
    source = open_sasi_source(cfg, dataset)
    online = None
    if cfg.online.producers > 0:
        from sasi_online.online.ring_source import OnlineTrainer

        online = OnlineTrainer(cfg, roles, len(dataset), as_numpy=cfg.augment.backend == "dali")
        source = online.source if t.pair_mode in NEEDS_SASI else None
    global_batch = t.batch_size * n_trainers
    sampler = StepSampler(len(dataset), t.batch_size, n_trainers, seed=t.seed)
    augmenter = build_augmenter(cfg.augment, cfg.data.image_size, seed=derive_seed(t.seed, rank),
                                max_batch=max(t.batch_size, 1))
    torch.manual_seed(derive_seed(t.seed, "init"))  # identical initial weights on every trainer
    method = (method_factory or build_method)(cfg.method, global_batch)
    num_local = cfg.method.local_crops if getattr(method, "multi_crop", False) else 0
    builder = PairBuilder(t.pair_mode, augmenter, source, num_global=method.num_global_views,
                          num_local=num_local)
    optimizer = build_optimizer(cfg.optim, method.param_groups(), global_batch)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    engine = build_engine(method, optimizer, scheduler,
                          deepspeed_config(cfg, t.batch_size, n_trainers), roles.mpu)
    device = engine.device
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32

    start, outcomes = 0, Counter()
    if found is not None:
        client = ckpt.load(engine, ckpt_dir, cfg, rank)
        start = int(client["step"])
        outcomes = Counter(client.get("sasi_outcomes", {}))
        if source is not None and client.get("source"):
            source.load_state_dict(client["source"])
        if online is not None:
            online.load(ckpt_dir, start)
    elif is_main:
        save_config(cfg, out / "config.yaml")

    logger = MetricsLogger(out, enabled=is_main)
    if found is not None:
        logger.drop_after(start)
    monitor = None
    if is_main:
        try:
            test_ds = build_dataset(cfg.data, "test")
        except UserInputError:
            test_ds = None  # no labelled test split: no kNN monitor
        if test_ds is not None:
            monitor = KnnMonitor(dataset, test_ds, augmenter, t.knn_bank, t.knn_test,
                                 cfg.eval.knn_k, cfg.eval.knn_t)
    result = TrainResult(out=out, step=start)
    make = MicroBatches(dataset, sampler, builder, t.seed, rank)
    if online is not None and source is not None:
        make = online.micro_batches(dataset, sampler, builder, t.seed, rank)
    if online is not None:
        online.wait_for_start(start * t.grad_accum)  # producers load models; not a step's wait
    ga = t.grad_accum
    last = t.steps if stop_at is None else min(stop_at, t.steps)
    batches = _iterate(make, start * ga, last * ga, t.num_workers)
    bar = tqdm(total=t.steps, initial=start, desc=f"train {cfg.method.name}/{t.pair_mode}",
               disable=not is_main, dynamic_ncols=True)
    step_losses: list[float] = []
    t_last, wait = time.perf_counter(), 0.0
    try:
        for step in range(start, last):
            extras: dict[str, float] = {"lr": scheduler.get_last_lr()[0]}  # the rate this step uses
            for a in range(ga):
                m = step * ga + a
                t0 = time.perf_counter()
                if online is not None:
                    online.before_micro_step(m)
                views, outs = next(batches)
                wait += time.perf_counter() - t0
                outcomes.update(outs)
                views = [v.to(device=device, dtype=dtype) for v in views]
                torch.manual_seed(derive_seed(t.seed, rank, m, "forward"))
                res = _loss_of(engine, views, t.pair_mode, step, t.steps)
                loss = res["loss"]
                if not _all_finite(loss, group):
                    kept = ckpt.latest(ckpt_dir)
                    where = f"'{ckpt_dir / kept[0]}' (step {kept[1]['step']})" if kept else "none yet"
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (micro-step {m}); training stopped. "
                        f"Last good checkpoint: {where}. Lower optim.lr, raise optim.warmup_steps "
                        f"or use train.precision=fp32, then resume with a new train.out or after "
                        f"fixing the config")
                engine.backward(loss)
                engine.step()
                step_losses.append(float(loss.detach()))
                for k, v in res.items():
                    if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                        extras[k] = float(v.detach())
            engine.module.on_step_end(step, t.steps)
            done = step + 1
            result.step = done
            if step_callback is not None:
                step_callback(done, engine.module)
            bar.update(1)
            if done % t.log_every == 0 or done == last:
                mean_loss = _mean_over(step_losses, group)
                now = time.perf_counter()
                n_steps = len(step_losses) / ga
                hits = outcomes.get("hit", 0)
                total_sasi = sum(outcomes.values())
                record = {"loss": mean_loss,
                          "momentum": float(getattr(engine.module, "last_momentum", 0.0) or 0.0),
                          "images_per_s": n_steps * ga * global_batch / max(now - t_last, 1e-9),
                          "data_wait_s": wait, **extras}
                if total_sasi:
                    record["sasi_hit_rate"] = hits / total_sasi
                    record.update({f"sasi_{k}": float(v) for k, v in outcomes.items()})
                if online is not None:
                    record.update(online.metrics.record(done * ga))
                result.losses[done] = mean_loss
                logger.log(done, record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", **(online.metrics.postfix(record) if online else {}))
                step_losses.clear()
                t_last, wait = now, 0.0
            if monitor is not None and (done % t.knn_every == 0 or done == t.steps):
                result.last_eval = monitor.evaluate(engine.module, device, dtype)
                logger.log(done, result.last_eval)
            if done % t.ckpt_every == 0 or done == last:
                _check_finite_params(engine.module, done)
                own = {"sasi_outcomes": dict(outcomes),
                       "source": source.state_dict() if source is not None else {}}
                save = functools.partial(ckpt.save, engine, ckpt_dir, done, cfg, {"step": done, **own},
                                         rank, group, rank_state=own)
                if online is not None:  # a quiet point: producers pause, in-flight SASI land first
                    online.save(ckpt_dir, done, done * ga, save)
                else:
                    save()
        if online is not None:
            online.finish(out if is_main else None, engine.module)
    finally:
        bar.close()
        logger.close()
    result.sasi_outcomes = dict(outcomes)
    return result


def _check_finite_params(method, step: int) -> None:
    for name, p in method.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteLossError(f"parameter '{name}' is non-finite after step {step}; not "
                                     f"saving it over the last good checkpoint. Lower optim.lr")


# ----------------------------------------------------------------------------- entry points
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny_cpu.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.steps=50 method.name=simclr")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") != "0":
        return 0  # one summary line per launch
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items())
    print(f"trained {result.step} steps into {result.out}" + (f" ({summary})" if summary else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from sasi_online.config import ConfigError

    parser = argparse.ArgumentParser(prog="sasi_online/train.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, UserInputError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
