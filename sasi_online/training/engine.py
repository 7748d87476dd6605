"""DeepSpeed engine set-up for the trainer group.

- One process without a launcher gets a 1-rank gloo group of its own, so the same
  DeepSpeed path (and checkpoint format) runs everywhere.
- The optimizer is a torch one passed in: DeepSpeed never builds (compiles) FusedAdam.
- The `deepspeed_shm_comm` op is disabled before init: it compiles for ~20 s on first
  use and leaves ~66 MiB per rank in /dev/shm, for no gain on a CPU.
- bf16 on a CPU needs `buffer_dtype: bf16`, or BatchNorm mixes dtypes.
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
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch SGD/LARS/AdamW
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
        # DeepSpeed 0.19 clips the global gradient norm to 1.0 unless told otherwise; no
        # recipe here does that (DINO's per-layer clip is the optimizer's optim.clip_grad)
        "gradient_clipping": 0.0,
    }
    if t.precision == "bf16":
        conf["bf16"] = {"enabled": True}
        conf["data_types"] = {"buffer_dtype": "bf16"}
    return conf


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
