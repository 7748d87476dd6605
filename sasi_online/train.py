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
    # where `ssl/` would shadow the standard library's ssl. Take it off, and the checkout's
    # top folder too: its `kernels/` would shadow the Hugging Face package of that name,
    # which transformers imports. The package is found where it is installed.
    import importlib.util

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (_here, _here.parent)]
    if importlib.util.find_spec("sasi_online") is None:
        sys.exit(f"train: error: the sasi_online package is not installed in this Python ({sys.executable}); "
                 f"run `pip install -e .` in the checkout '{_here.parent}', then start the trainer again")

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from sasi_online.config import Config, load_config  # noqa: E402
from sasi_online.errors import OnlineGenerationError, UserInputError  # noqa: E402
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

    from sasi_online.online.settings import check_online_config, online_enabled

    t = cfg.train
    check_online_config(cfg)  # online.mode first: it decides what follows
    online = online_enabled(cfg)
    check_pair_mode(t.pair_mode, cfg.store.path is not None or online)
    for name in ("batch_size", "steps", "log_every", "ckpt_every", "knn_every"):
        if getattr(t, name) < 1:
            raise UserInputError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    load_recipe(cfg.augment.recipe)
    if online and t.num_workers > 0 and cfg.augment.backend == "dali":
        raise UserInputError("train.num_workers must be 0 with online generation and augment.backend=dali: "
                             "SASI arrive in the trainer process (the ring) and DALI builds the pairs there; "
                             "set train.num_workers=0, or use augment.backend=torchvision (real views in "
                             "workers, ring views on the device)")
    if cfg.augment.backend not in ("torchvision", "dali"):
        raise UserInputError(f"augment.backend must be torchvision or dali, got '{cfg.augment.backend}'")
    from sasi_online.training.engine import deepspeed_config

    deepspeed_config(cfg, t.batch_size, num_trainers)  # zero_stage, precision, grad_accum
    if t.dist_timeout_s < 1:
        raise UserInputError(f"train.dist_timeout_s must be >= 1, got {t.dist_timeout_s}")
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
    from sasi_online.online.settings import online_enabled

    if online_enabled(cfg):
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
    from sasi_online.training.sources import iterate

    return iterate(make, first, last, num_workers)


# ----------------------------------------------------------------------------- trainer
def train(cfg: Config, *, stop_at: Optional[int] = None,
          step_callback: Optional[Callable[[int, Any], None]] = None,
          method_factory: Optional[Callable[[Any, int], Any]] = None) -> TrainResult:
    """Train `cfg.train.steps` optimizer steps (resuming from `train.out` if it holds a
    checkpoint). `stop_at` ends the run early after that step's checkpoint, as a
    pre-emption would; `step_callback(step, method)` runs after each optimizer step;
    `method_factory(cfg.method, global_batch)` replaces `ssl.build_method` (e.g. a method
    on a custom backbone)."""
    limit_threads()
    from sasi_online.config import resolve_recipe
    from sasi_online.training.engine import destroy_process_group, init_process_group

    resolve_recipe(cfg)  # fields left None: the method's published recipe (built configs too)

    validate(cfg, num_trainers=1)  # before the process group: cheap errors first
    created_group = init_process_group(cfg.train.dist_timeout_s)
    from sasi_online.online import groups
    from sasi_online.ssl import distributed as ssl_dist

    try:
        from sasi_online.online.roles import setup_roles

        roles = setup_roles(cfg.online.producers, cfg.train.dist_timeout_s, cfg.online.mode,
                            cfg.online.producers_per_node)
        validate(cfg, num_trainers=roles.num_trainers)
        if roles.is_producer:
            from sasi_online.online.producer import run_producer

            run_producer(cfg, roles)
            return TrainResult(out=Path(cfg.train.out), step=0)
        ssl_dist.set_group(roles.trainer_group)  # the methods' gathers: the model plane
        return _train_on_trainer(cfg, roles, stop_at, step_callback, method_factory)
    finally:
        ssl_dist.set_group(None)
        groups.set_current(None)
        if created_group:
            destroy_process_group()


def _train_on_trainer(cfg, roles, stop_at, step_callback, method_factory) -> TrainResult:
    """Set-up, then the loop (training/loop.py); batches come from training/sources.py."""
    from sasi_online.training.loop import loop, set_up

    run = set_up(cfg, roles, method_factory)
    loop(run, cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps), step_callback)
    return run.result


# ----------------------------------------------------------------------------- entry points
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a YAML file, or a shipped config by name: tiny_cpu, imagenet100/byol, "
                             "cifar10/swav, ... (the configs/ folder; `include:` composes them)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.steps=50 method.name=simclr")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (includes, overrides, --deepspeed_config "
                             "and the method's recipe applied: what training would use) and exit")
    from sasi_online.training.engine import add_deepspeed_arguments

    add_deepspeed_arguments(parser)  # --deepspeed, --deepspeed_config FILE


def resolved_config(args: argparse.Namespace) -> Config:
    """The config a run of `args` trains with; `--print-config` prints this very object."""
    from sasi_online.config import resolve_recipe
    from sasi_online.training.engine import read_user_config

    cfg = load_config(args.config, args.overrides)
    ds_file = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if ds_file:
        cfg.train.deepspeed = {**cfg.train.deepspeed, **read_user_config(ds_file)}
    return resolve_recipe(cfg)


def run(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    if getattr(args, "print_config", False):
        import yaml

        from sasi_online.training.engine import deepspeed_config

        deepspeed_config(cfg, cfg.train.batch_size, 1)  # refused DeepSpeed keys fail here too
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        result = train(cfg)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OnlineGenerationError as exc:  # every rank: trainers and producers alike
        print(f"error: rank {os.environ.get('RANK', '0')}: {exc}", file=sys.stderr)
        return 4
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
