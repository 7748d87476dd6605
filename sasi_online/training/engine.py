"""DeepSpeed engine set-up for the trainer group.

- One process without a launcher gets a 1-rank gloo group of its own, so the same
  DeepSpeed path (and checkpoint format) runs everywhere.
- The optimizer is a torch one passed in: DeepSpeed never builds (compiles) FusedAdam.
- The `deepspeed_shm_comm` op is disabled before init: it compiles for ~20 s on first
  use and leaves ~66 MiB per rank in /dev/shm, for no gain on a CPU.
- bf16 on a CPU needs `buffer_dtype: bf16`, or BatchNorm mixes dtypes.
- No device sync inside a step: DeepSpeed's throughput timer and wall-clock breakdown are
  off, bf16 never runs on DeepSpeed's FP16_UnfusedOptimizer (stage 0 + bf16 runs at ZeRO
  stage 1, see `zero_stage_for`), and the bf16 overflow check (one `.item()` per step) is
  off: the loop finds a non-finite loss itself (training/loop.py, DeviceTally).
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from sasi_online.errors import UserInputError


_SINGLE_RANK_ENV: dict[str, Optional[str]] = {}  # launcher variables set for a 1-rank group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_deepspeed() -> None:
    """DeepSpeed logs every step at INFO; keep warnings."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(timeout_s: Optional[float] = None) -> bool:
    """Start torch.distributed: from the launcher's environment, or a 1-rank group.

    Returns True when this call started the group (the caller destroys it at the end:
    a launched rank that exits with its gloo group alive can hang at interpreter exit).
    `timeout_s` bounds every collective and store wait of the job (train.dist_timeout_s).
    """
    quiet_deepspeed()
    from sasi_online.online.roles import default_backend, init_distributed

    if dist.is_available() and dist.is_initialized():
        return False  # the caller owns the group
    if init_distributed(timeout_s):
        return True
    import deepspeed

    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    # Remembered so that destroy_process_group() takes them back out: left behind, they make
    # a later train() in this process look launched, and leak a stale port into subprocesses.
    _SINGLE_RANK_ENV.update({k: os.environ.get(k) for k in single})
    os.environ.update(single)
    kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=default_backend(), **kw)
    return True


ZERO0_BF16_NOTE = ("train.zero_stage=0 with train.precision=bf16 runs at ZeRO stage 1: at stage 0 "
                   "DeepSpeed wraps bf16 in FP16_UnfusedOptimizer, which reads an overflow flag back "
                   "from the device for every parameter at every step; stage 1 keeps the fp32 master "
                   "weights too (split over the trainers). A checkpoint written at stage 0 resumes")


def zero_stage_for(train_cfg) -> int:
    """The ZeRO stage DeepSpeed runs: `train.zero_stage`, except bf16 at stage 0 -> stage 1
    (ZERO0_BF16_NOTE). The config keeps its own value (and so its hash: resumes match)."""
    if train_cfg.precision == "bf16" and train_cfg.zero_stage == 0:
        return 1
    return train_cfg.zero_stage


def announce_zero_stage(train_cfg, is_main: bool) -> None:
    """One line when the stage DeepSpeed runs differs from train.zero_stage."""
    if is_main and zero_stage_for(train_cfg) != train_cfg.zero_stage:
        print(ZERO0_BF16_NOTE, flush=True)


def deepspeed_config(cfg, micro_batch: int, num_trainers: int) -> dict:
    t = cfg.train
    if t.zero_stage not in (0, 1, 2):
        raise UserInputError(f"train.zero_stage must be 0, 1 or 2 (got {t.zero_stage}); stage 3 "
                             f"is not supported for these small encoders")
    if t.precision not in ("fp32", "bf16"):
        raise UserInputError(f"train.precision must be fp32 or bf16, got '{t.precision}'")
    if t.grad_accum < 1:
        raise UserInputError(f"train.grad_accum must be >= 1, got {t.grad_accum}")
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro_batch * t.grad_accum * num_trainers,
        "zero_optimization": {"stage": zero_stage_for(t)},
        "zero_allow_untested_optimizer": True,  # our torch SGD/LARS/AdamW
        "steps_per_print": 10 ** 9,
        # per-phase timers: a device sync around every forward, backward and step (a user's
        # --deepspeed_config may turn it on to profile, and then pays those syncs)
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
        # DeepSpeed's throughput timer is on and synchronised by default: a device sync at
        # every forward and step. The trainer logs images/s itself (train.log_every).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        # DeepSpeed 0.19 clips the global gradient norm to 1.0 unless told otherwise; no
        # recipe here does that (DINO's per-layer clip is the optimizer's optim.clip_grad)
        "gradient_clipping": 0.0,
    }
    if t.precision == "bf16":
        # check_grad_overflow: DeepSpeed's ZeRO reads an overflow flag back (`.item()`) every
        # step to skip it; bf16 has no loss scale to lower, and the loop stops on a non-finite
        # loss itself (the last good checkpoint kept), as it does in fp32
        conf["bf16"] = {"enabled": True, "check_grad_overflow": False}
        conf["data_types"] = {"buffer_dtype": "bf16"}
    return merge_user_config(conf, t.deepspeed)


# DeepSpeed keys this project sets itself -> the config key that sets them. A user JSON that
# names one is refused: DeepSpeed would act on it while the trainer's own state (its batch
# sampler, its torch optimizer and schedule, its checkpoints) follows the project's value.
OWNED_KEYS = {
    "train_batch_size": "train.batch_size (per trainer) x train.grad_accum x trainers",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "bf16": "train.precision", "fp16": "train.precision", "amp": "train.precision",
    "data_types": "train.precision",
    "optimizer": "optim.name and optim.* (the optimizer is built by the project and passed in)",
    "scheduler": "optim.lr, optim.warmup_steps / optim.warmup_epochs and optim.min_lr (the schedule is the project's)",
    "timers": "none: DeepSpeed's throughput timer syncs the device every step; train.log_every logs images/s",
    "zero_optimization.stage": "train.zero_stage",
    "checkpoint.tag_validation": "none: producers do not join DeepSpeed's tag validation; a resume checks "
                                 "the config hash in meta.json instead",
}


def merge_user_config(conf: dict, user: dict, source: str = "train.deepspeed (--deepspeed_config)") -> dict:
    """`user` (a DeepSpeed JSON's entries) merged over the generated `conf`, nested dicts key
    by key. Keys in OWNED_KEYS are refused, all of them in one message."""
    refused = []
    for key, value in user.items():
        if key in OWNED_KEYS:
            refused.append((key, OWNED_KEYS[key]))
        elif isinstance(value, dict):
            refused += [(f"{key}.{k}", OWNED_KEYS[f"{key}.{k}"]) for k in value if f"{key}.{k}" in OWNED_KEYS]
    if refused:
        listed = "; ".join(f"'{k}' (set {where})" for k, where in refused)
        raise UserInputError(f"{source}: the DeepSpeed config may not set {listed}. Remove "
                             f"{'it' if len(refused) == 1 else 'them'} from the JSON; every other "
                             f"DeepSpeed key is merged over the generated config")
    out = dict(conf)
    for key, value in user.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_user_config(path: str) -> dict:
    """A DeepSpeed JSON file (`--deepspeed_config`), checked to be an object."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"--deepspeed_config '{p}' does not exist; pass the path of a DeepSpeed "
                             f"JSON file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--deepspeed_config '{p}' is not valid JSON ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise UserInputError(f"--deepspeed_config '{p}' holds a {type(data).__name__}; a DeepSpeed config "
                             f"is a JSON object ({{\"zero_optimization\": {{...}}, ...}})")
    return data


def add_deepspeed_arguments(parser) -> None:
    """DeepSpeed's own launcher flags (`deepspeed.add_config_arguments`): --deepspeed,
    --deepspeed_config FILE (merged over the generated config, see merge_user_config)."""
    quiet_deepspeed()
    import deepspeed

    deepspeed.add_config_arguments(parser)
    for action in parser._actions:  # say what the merge does
        if action.dest == "deepspeed_config":
            action.help = ("a DeepSpeed JSON merged over the config the trainer generates (e.g. "
                           "zero_optimization buckets, comms_logger). Refused, with the key to use "
                           "instead: batch sizes, gradient accumulation, bf16/fp16/data_types, optimizer, "
                           "scheduler, timers, zero_optimization.stage, checkpoint.tag_validation")
        elif action.dest == "deepspeed":
            action.help = "accepted for DeepSpeed's conventions; the trainer always runs DeepSpeed"


def build_engine(method: torch.nn.Module, optimizer, scheduler, ds_config: dict, mpu: Any):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu, dist_init_required=False)
    if hasattr(method, "keep_fp32_state"):
        method.keep_fp32_state()  # targets, queues, banks: fp32 again after DeepSpeed's bf16 cast
    from sasi_online.training.optim import configure_partitioning

    configure_partitioning(optimizer, engine, mpu.get_data_parallel_group() if mpu is not None else None)
    from sasi_online.training.checkpoint import SafeCheckpointEngine

    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    return engine


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, before in _SINGLE_RANK_ENV.items():  # the environment as it was before our 1-rank group
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    _SINGLE_RANK_ENV.clear()
