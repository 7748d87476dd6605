"""The trainer loop in parts: set-up, step, log, checkpoint; batches from a source.

    run = set_up(cfg, roles, method_factory)     # data, method, engine, resume, logger
    loop(run, last, step_callback)               # step -> log -> kNN -> checkpoint, repeated

Nothing in a step waits on the host: the loss sum and the finite flag (the first
non-finite micro-step) stay on the trainer's device and are reduced over the trainers'
gloo control group on log steps and before every checkpoint, where a non-finite value
stops the run with the last good checkpoint kept. An online run that gets no SASI stops
on a log step too, after writing a checkpoint (online/health.py).
"""
from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sasi_online.online.groups import control_reduce
from sasi_online.utils import derive_seed

_NONE = float(2 ** 62)  # "no non-finite micro-step yet"


class DeviceTally:
    """Per-interval loss sum, scalar extras and the first non-finite micro-step, on device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad = torch.full((), _NONE, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.extras: dict[str, torch.Tensor] = {}

    def add(self, res: dict, m: int) -> None:
        loss = res["loss"].detach()
        bad = ~torch.isfinite(loss).all() & (self.first_bad == _NONE)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, float(m)), self.first_bad)
        self.loss_sum += loss.to(torch.float64)
        self.count += 1
        self.extras.update({k: v.detach() for k, v in res.items()
                            if k != "loss" and torch.is_tensor(v) and v.numel() == 1})

    def first_bad_over_trainers(self) -> Optional[int]:
        """Collective (control group): the earliest non-finite micro-step of any trainer."""
        worst = control_reduce([float(self.first_bad.cpu())], "min")[0]
        return None if worst >= _NONE else int(worst)

    def interval_over_trainers(self) -> tuple[float, Optional[int], dict]:
        """Collective (control group): mean loss this interval, first bad micro-step, extras."""
        names = sorted(self.extras)
        local = torch.stack([self.loss_sum, self.first_bad, *[self.extras[k].double() for k in names]]).cpu()
        total = control_reduce([float(local[0]), float(self.count)], "sum")
        worst = control_reduce([float(local[1])], "min")[0]
        extras = {k: float(v) for k, v in zip(names, local[2:].tolist())}
        mean = float(total[0] / max(total[1], 1.0))
        return mean, (None if worst >= _NONE else int(worst)), extras


@dataclass
class Run:
    cfg: Any
    roles: Any
    engine: Any
    scheduler: Any
    source: Any  # training/sources.py
    logger: Any
    monitor: Any
    result: Any
    start: int
    outcomes: Counter = field(default_factory=Counter)
    bar: Any = None
    tally: Any = None
    t_last: float = 0.0
    wait: float = 0.0
    steps_in_interval: int = 0
    lr: float = 0.0
    memory_format: torch.memory_format = torch.preserve_format  # channels_last: a CNN on CUDA (speed.py)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.roles.trainer_rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32


# ----------------------------------------------------------------------------- set-up
def _resume_point(cfg, is_main: bool):
    from sasi_online.training import checkpoint as ckpt

    out = Path(cfg.train.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    found = ckpt.latest(out / "checkpoints") if cfg.train.resume else None
    if found is not None:
        ckpt.check_config(out / "checkpoints", cfg)  # before any work
    return found


def _knn_monitor(cfg, dataset, augmenter, is_main: bool):
    from sasi_online.data.datasets import build_dataset
    from sasi_online.errors import UserInputError
    from sasi_online.training.knn_monitor import KnnMonitor

    if not is_main:
        return None
    try:
        test_ds = build_dataset(cfg.data, "test")
    except UserInputError:
        return None  # no labelled test split: no kNN monitor
    t = cfg.train
    return KnnMonitor(dataset, test_ds, augmenter, t.knn_bank, t.knn_test, cfg.eval.knn_k, cfg.eval.knn_t)


def _model_and_engine(cfg, roles, method_factory, builder_for_method, num_images: int = 0):
    """(engine, scheduler, memory format of the views): the method, its optimizer and
    schedule, set for the trainer's device (speed.py) and wrapped by DeepSpeed."""
    from sasi_online.online.groups import trainer_device
    from sasi_online.ssl import build_method
    from sasi_online.training.engine import announce_zero_stage, build_engine, deepspeed_config
    from sasi_online.training.optim import build_optimizer
    from sasi_online.training.schedule import build_scheduler
    from sasi_online.training.speed import apply_backbone_settings

    t = cfg.train
    global_batch = t.batch_size * roles.num_trainers
    device = trainer_device()
    torch.manual_seed(derive_seed(t.seed, "init"))  # identical initial weights on every trainer
    method = (method_factory or build_method)(cfg.method, global_batch)
    method.steps_per_epoch = max(num_images // (global_batch * t.grad_accum), 1)  # epoch-valued knobs
    builder_for_method(method)
    memory_format = apply_backbone_settings(method, device)
    optimizer = build_optimizer(cfg.optim, method.param_groups(), global_batch, device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps, method.steps_per_epoch)
    announce_zero_stage(t, roles.trainer_rank == 0)
    engine = build_engine(method, optimizer, scheduler, deepspeed_config(cfg, t.batch_size, roles.num_trainers),
                          roles.mpu)
    return engine, scheduler, memory_format


def set_up(cfg, roles, method_factory=None) -> Run:
    """Everything before the first step, resume included (collective over the trainers)."""
    from sasi_online.config import save_config
    from sasi_online.data.augment import build_augmenter
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.pairs import PairBuilder
    from sasi_online.data.sampler import StepSampler
    from sasi_online.training import checkpoint as ckpt
    from sasi_online.training.metrics import MetricsLogger
    from sasi_online.training.sources import build_source

    t, rank, is_main = cfg.train, roles.trainer_rank, roles.trainer_rank == 0
    found = _resume_point(cfg, is_main)
    dataset = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(dataset), t.batch_size, roles.num_trainers, seed=t.seed)
    augmenter = build_augmenter(cfg.augment, cfg.data.image_size, seed=derive_seed(t.seed, rank),
                                max_batch=max(t.batch_size, 1))
    views: dict = {}
    engine, scheduler, memory_format = _model_and_engine(cfg, roles, method_factory, lambda m: views.update(
        num_global=m.num_global_views, num_local=cfg.method.local_crops if getattr(m, "multi_crop", False) else 0),
        len(dataset))
    source = build_source(cfg, roles, dataset, sampler,
                          lambda sasi: PairBuilder(t.pair_mode, augmenter, sasi, **views))
    start, outcomes = 0, Counter()
    if found is not None:
        client = ckpt.load(engine, Path(t.out) / "checkpoints", cfg, rank)
        start, outcomes = int(client["step"]), Counter(client.get("sasi_outcomes", {}))
        source.load_state_dict(client.get("source") or {}, Path(t.out) / "checkpoints", start)
    elif is_main:
        save_config(cfg, Path(t.out) / "config.yaml")
    logger = MetricsLogger(Path(t.out), enabled=is_main)
    if found is not None:
        logger.drop_after(start)
    from sasi_online.train import TrainResult

    return Run(cfg, roles, engine, scheduler, source, logger, _knn_monitor(cfg, dataset, augmenter, is_main),
               TrainResult(out=Path(t.out), step=start), start, outcomes, memory_format=memory_format)


# ----------------------------------------------------------------------------- step
def _loss_of(engine, views, pair_mode: str, step: int, total: int) -> dict:
    if pair_mode == "three_flow":  # losses on (1,2) and (1,3), averaged
        a = engine([views[0], views[1]], step, total)
        b = engine([views[0], views[2]] + list(views[3:]), step, total)
        return {k: (a[k] + b[k]) / 2 for k in a if k in b}
    return engine(list(views), step, total)


def train_step(run: Run, step: int) -> None:
    """One optimizer step (train.grad_accum micro-steps); no host sync."""
    t, engine = run.cfg.train, run.engine
    run.lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (a host float)
    for a in range(t.grad_accum):
        m = step * t.grad_accum + a
        t0 = time.perf_counter()
        views, outs = run.source.next(m)
        run.wait += time.perf_counter() - t0
        run.outcomes.update(outs)
        views = [v.to(device=engine.device, dtype=run.dtype, memory_format=run.memory_format, non_blocking=True)
                 for v in views]
        torch.manual_seed(derive_seed(t.seed, run.roles.trainer_rank, m, "forward"))
        res = _loss_of(engine, views, t.pair_mode, step, t.steps)
        run.tally.add(res, m)
        engine.backward(res["loss"])
        engine.step()
    run.steps_in_interval += 1
    engine.module.on_step_end(step, t.steps)


def _stop_non_finite(run: Run, bad_micro: int) -> None:
    from sasi_online.train import NonFiniteLossError
    from sasi_online.training import checkpoint as ckpt

    kept = ckpt.latest(run.ckpt_dir)
    where = f"'{run.ckpt_dir / kept[0]}' (step {kept[1]['step']})" if kept else "none yet"
    raise NonFiniteLossError(
        f"non-finite loss at step {bad_micro // run.cfg.train.grad_accum} (micro-step {bad_micro}); training "
        f"stopped. Last good checkpoint: {where}. Lower optim.lr, raise optim.warmup_steps or use "
        f"train.precision=fp32, then resume with a new train.out or after fixing the config")


# ----------------------------------------------------------------------------- log
def log_step(run: Run, done: int) -> None:
    """Collective over the trainers' control group (every trainer logs the same steps)."""
    t = run.cfg.train
    mean_loss, bad, extras = run.tally.interval_over_trainers()
    if bad is not None:
        _stop_non_finite(run, bad)
    now = time.perf_counter()
    images = run.steps_in_interval * t.grad_accum * t.batch_size * run.roles.num_trainers
    record = {"loss": mean_loss, "lr": run.lr,
              "momentum": float(getattr(run.engine.module, "last_momentum", 0.0) or 0.0),
              "images_per_s": images / max(now - run.t_last, 1e-9), "data_wait_s": run.wait, **extras}
    total_sasi = sum(run.outcomes.values())
    if total_sasi:
        record["sasi_hit_rate"] = run.outcomes.get("hit", 0) / total_sasi
        record.update({f"sasi_{k}": float(v) for k, v in run.outcomes.items()})
    record.update(run.source.metrics(done * t.grad_accum))
    run.result.losses[done] = mean_loss
    run.logger.log(done, record)
    run.bar.set_postfix(loss=f"{mean_loss:.4f}", **run.source.postfix(record))
    run.tally.reset()
    run.t_last, run.wait, run.steps_in_interval = now, 0.0, 0


# ----------------------------------------------------------------------------- checkpoint
def _params_finite(module: torch.nn.Module) -> Optional[str]:
    """Name of the first non-finite parameter (one host sync), or None."""
    params = list(module.named_parameters())
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu() if params else None
    if flags is None or bool(flags.all()):
        return None
    return params[int((~flags).nonzero()[0])][0]


def checkpoint_step(run: Run, done: int) -> None:
    """Check finiteness over all trainers, then save (a quiet point for online sources)."""
    from sasi_online.train import NonFiniteLossError
    from sasi_online.training import checkpoint as ckpt

    bad = run.tally.first_bad_over_trainers()
    if bad is not None:
        _stop_non_finite(run, bad)
    name = _params_finite(run.engine.module)
    if control_reduce([0.0 if name is None else 1.0], "max")[0] > 0:
        raise NonFiniteLossError(f"parameter '{name or '(on another trainer)'}' is non-finite after step {done}; "
                                 f"not saving it over the last good checkpoint. Lower optim.lr")
    rank = run.roles.trainer_rank
    own = {"sasi_outcomes": dict(run.outcomes), "source": run.source.state_dict()}
    save = functools.partial(ckpt.save, run.engine, run.ckpt_dir, done, run.cfg, {"step": done, **own},
                             rank, run.roles.control_group, rank_state=own)
    run.source.checkpoint(run.ckpt_dir, done, done * run.cfg.train.grad_accum, save)


def _stop_without_sasi(run: Run, done: int, last: int, saved: bool) -> None:
    """Collective: an online run that asked for SASI and gets none stops here, after its
    checkpoint, with the job's end protocol done so that every rank exits."""
    from sasi_online.errors import OnlineGenerationError
    from sasi_online.online.health import how_to_resume
    from sasi_online.training import checkpoint as ckpt

    problem = run.source.supply_problem(final=done == last)
    if problem is None:
        return
    if not saved:
        checkpoint_step(run, done)
    message = how_to_resume(problem, done, str(run.ckpt_dir / ckpt.tag_of(done)))
    run.source.fail(message)
    run.source.finish(run.out if run.is_main else None, run.engine.module)
    raise OnlineGenerationError(message)


# ----------------------------------------------------------------------------- the loop
def loop(run: Run, last: int, step_callback: Optional[Callable[[int, Any], None]] = None) -> None:
    from tqdm import tqdm

    t = run.cfg.train
    run.tally = DeviceTally(run.engine.device)
    run.source.start(run.start * t.grad_accum, last * t.grad_accum)
    run.bar = tqdm(total=t.steps, initial=run.start, desc=f"train {run.cfg.method.name}/{t.pair_mode}",
                   disable=not run.is_main, dynamic_ncols=True)
    run.t_last = time.perf_counter()
    try:
        for step in range(run.start, last):
            train_step(run, step)
            done = run.result.step = step + 1
            if step_callback is not None:
                step_callback(done, run.engine.module)
            run.bar.update(1)
            if done % t.log_every == 0 or done == last:
                log_step(run, done)
            if run.monitor is not None and (done % t.knn_every == 0 or done == t.steps):
                run.result.last_eval = run.monitor.evaluate(run.engine.module, run.engine.device, run.dtype)
                run.logger.log(done, run.result.last_eval)
            saved = done % t.ckpt_every == 0 or done == last
            if saved:
                checkpoint_step(run, done)
            if done % t.log_every == 0 or done == last:
                _stop_without_sasi(run, done, last, saved)
        run.source.finish(run.out if run.is_main else None, run.engine.module)
    finally:
        run.bar.close()
        run.logger.close()
    run.result.sasi_outcomes = dict(run.outcomes)
