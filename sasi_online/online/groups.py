"""The job's process groups, and which one each collective runs on.

Two planes (ARCHITECTURE.md, "Roles and process groups"):
- **model plane** (`trainer`): gradients and the methods' gathers, shuffle-BN, centres,
  queues, Sinkhorn. Its backend carries the trainer's device: NCCL for CUDA, gloo for the CPU.
- **control plane** (`control`, trainers only; `world_control`, every rank): finite flags,
  loss and metric means, counters, ring and outcome bookkeeping, checkpoint barriers, the
  end of the job, and the SASI transport. Always gloo on host tensors, whatever the world's
  backend: an NCCL group has no backend for CPU tensors ("No backend type associated with
  device type cpu"), and nothing here is watched by an NCCL watchdog.

`group_for(tensor, plane)` picks the group and refuses a tensor whose device the plane's
backend cannot carry, so a CPU tensor sent to an NCCL group fails here, by name, on a CPU
machine too. Without torch.distributed every helper is the identity.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

MODEL, CONTROL = "model", "control"


class GroupMismatchError(RuntimeError):
    """A collective was asked to carry a tensor its process group's backend cannot."""


def trainer_device() -> torch.device:
    """The device DeepSpeed gives this trainer: its local GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class Groups:
    trainer: Any  # model plane (None in one process without torch.distributed)
    control: Any  # gloo, the trainers
    world_control: Any  # gloo, every rank
    device: torch.device  # the trainers' device (the model plane's tensors live there)


_CURRENT: Optional[Groups] = None


def current() -> Optional[Groups]:
    return _CURRENT


def set_current(groups: Optional[Groups]) -> None:
    global _CURRENT
    _CURRENT = groups


def create_groups(trainer_ranks: Sequence[int], world: int, device: torch.device,
                  timeout: Optional[timedelta] = None) -> Groups:
    """Collective (`dist.new_group`): call on every rank, in the same order."""
    kw = {"timeout": timeout} if timeout is not None else {}
    trainers = list(trainer_ranks)
    groups = Groups(trainer=dist.new_group(trainers, backend=backend_for(device), **kw),
                    control=dist.new_group(trainers, backend="gloo", **kw),
                    world_control=dist.new_group(list(range(world)), backend="gloo", **kw),
                    device=torch.device(device))
    set_current(groups)
    return groups


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_for(t: torch.Tensor, plane: str = MODEL, groups: Optional[Groups] = None) -> Any:
    """The group a collective on `t` runs on; raises GroupMismatchError when that group's
    backend cannot carry `t`'s device."""
    groups = groups or _CURRENT
    if groups is None:
        return None  # not set up: torch.distributed's default group, as before
    if plane == CONTROL:
        if t.device.type != "cpu":
            raise GroupMismatchError(f"control-plane collectives run on gloo with host tensors; got a tensor "
                                     f"on {t.device}: copy it to the host first (.cpu()), on a log step")
        return groups.control
    if plane != MODEL:
        raise ValueError(f"plane must be '{MODEL}' or '{CONTROL}', got '{plane}'")
    if t.device.type != groups.device.type:
        raise GroupMismatchError(
            f"model-plane collective on a {t.device.type} tensor, but the trainer group carries "
            f"{groups.device.type} tensors ({backend_for(groups.device)}): build the tensor on the trainer's "
            f"device, or use the control plane (groups.control_*) for bookkeeping")
    return groups.trainer


# ----------------------------------------------------------------------------- control plane
def control_reduce(values: Any, op: str = "sum", groups: Optional[Groups] = None) -> np.ndarray:
    """Reduce float64 host values over the trainers' gloo group; returns a numpy array."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).clone().reshape(-1)
    if _distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op], group=group_for(t, CONTROL, groups))
    return t.numpy()


def control_barrier(groups: Optional[Groups] = None) -> None:
    groups = groups or _CURRENT
    if _distributed():
        dist.barrier(group=groups.control if groups is not None else None)


@contextlib.contextmanager
def barriers_on_control(groups: Optional[Groups] = None):
    """Route DeepSpeed's own world barriers (engine.save_checkpoint issues two) through the
    trainers' gloo group while the block runs: a world barrier would ask producers (busy
    generating) to join, and under NCCL it would be a device op on a bookkeeping path."""
    import deepspeed.comm as ds_comm

    groups = groups or _CURRENT
    original = ds_comm.barrier
    target = groups.control if groups is not None else None

    def barrier(group=None, *args, **kwargs):
        return original(target if group is None else group, *args, **kwargs)

    ds_comm.barrier = barrier
    try:
        yield
    finally:
        ds_comm.barrier = original
