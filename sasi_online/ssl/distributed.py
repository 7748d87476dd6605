"""Cross-trainer collectives for the SSL methods.

Every collective here runs over ONE process group: the trainers' model-plane group when
the trainer calls `set_group(group)` (producers must never be asked to join a gather), the
default group otherwise. These are model tensors on the trainer's device; the group's
backend matches that device (NCCL for CUDA), and a tensor on another device is refused by
name (online/groups.py) instead of failing deep inside the backend. Without
torch.distributed initialised every helper is the identity, so methods run unchanged in
one process and in tests.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

_GROUP: Any = None  # None = torch.distributed's default (world) group


def set_group(group: Any) -> None:
    """Confine every gather / reduce / broadcast of the methods to `group` (the trainers)."""
    global _GROUP
    _GROUP = group


def get_group() -> Any:
    return _GROUP


def _pick(t: torch.Tensor, group: Any) -> Any:
    """The explicit group, else the model plane (device-checked), else the set group."""
    if group is not None:
        return group
    from sasi_online.online.groups import MODEL, current, group_for

    groups = current()
    if groups is not None and _GROUP is groups.trainer:
        return group_for(t, MODEL, groups)
    return _GROUP


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    if not is_distributed():
        return 1
    return dist.get_world_size(group if group is not None else _GROUP)


def rank(group: Any = None) -> int:
    """This process's rank INSIDE the group (0 when not distributed)."""
    if not is_distributed():
        return 0
    return dist.get_rank(group if group is not None else _GROUP)


@torch.no_grad()
def gather(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate `t` from every rank of the group along dim 0, without gradients.

    Used for queue pushes and keys (MoCo, SwAV): gradients never flow through them.
    """
    group = _pick(t, group)
    if world_size(group) == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def gather_with_grad(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Like `gather`, but gradients flow back to each rank's own slice.

    torch.distributed.nn's all_gather sums the incoming gradients over ranks in its
    backward; with the engine averaging parameter gradients over ranks this yields the
    exact gradient of a loss computed over the global batch (SimCLR, Barlow Twins, VICReg).
    """
    group = _pick(t, group)
    if world_size(group) == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous(), group=group if group is not None else dist.group.WORLD), dim=0)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `t` over the group in place (identity in one process); returns `t`."""
    group = _pick(t, group)
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def broadcast_from_first(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Overwrite `t` on every rank with the group's first rank's value."""
    group = _pick(t, group)
    if world_size(group) > 1:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(t, src=src, group=group)
    return t


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, group: Any = None,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN, first half: mix samples across the trainers' batches.

    Returns this rank's slice of the globally shuffled batch and the global index that
    undoes the shuffle (pass it to `unshuffle_batch`). In one process it only permutes.
    """
    x_all = gather(x, group)
    perm = torch.randperm(x_all.shape[0], device=x.device, generator=generator)
    perm = broadcast_from_first(perm, group)
    undo = torch.argsort(perm)
    mine = perm.view(world_size(group), -1)[rank(group)]
    return x_all[mine], undo


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, undo: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Second half of shuffle-BN: bring this rank's own samples back, in order."""
    x_all = gather(x, group)
    mine = undo.view(world_size(group), -1)[rank(group)]
    return x_all[mine]
