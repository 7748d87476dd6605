"""Rank roles for one launch: trainers first, producers on the last ranks.

Trainers get their own process groups (groups.py: a model plane whose backend matches
their device, a gloo control plane beside it), and DeepSpeed gets an `mpu` that confines
data parallelism to the model plane (without one `deepspeed.initialize` waits for
producers that never join). Producers sit on the last ranks because DeepSpeed writes
`latest` and `zero_to_fp32.py` only on global rank 0, which must be a trainer.
The same code runs with gloo on a CPU and NCCL on GPUs.

On several nodes (`local_layout`: the launcher's variables, DeepSpeed's LOCAL_SIZE or
torchrun's LOCAL_WORLD_SIZE) `online.producers_per_node=P` puts the producers on the last
P local ranks of every node instead (`producer_ranks_for`): each node then generates for
the trainers beside it, and every node's GPUs count the same roles.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from sasi_online.errors import UserInputError


@dataclass
class Roles:
    rank: int
    world_size: int
    num_producers: int
    trainer_ranks: list[int]
    producer_ranks: list[int]
    trainer_group: Any = None  # model plane: the trainers, backend of their device (None: not distributed)
    control_group: Any = None  # control plane: the trainers, gloo (bookkeeping, barriers)
    transport_group: Any = None  # every rank, gloo: producer -> trainer sends and the end of the job
    mpu: Any = None  # DeepSpeed model-parallel unit for the trainers
    groups: Any = None  # groups.Groups (the three above and the trainers' device)

    @property
    def is_producer(self) -> bool:
        return self.rank in self.producer_ranks

    @property
    def is_trainer(self) -> bool:
        return not self.is_producer

    @property
    def num_trainers(self) -> int:
        return len(self.trainer_ranks)

    @property
    def trainer_rank(self) -> int:
        """Rank inside the trainer group (-1 on a producer)."""
        return self.trainer_ranks.index(self.rank) if self.is_trainer else -1

    def owner_of(self, image_index: int) -> int:
        """A fixed trainer per image index (index mod trainers), for routing without a plan.

        The sampler does not shard by index (any trainer may draw any image): producers
        route each SASI to the trainer whose batch will hold its image (look-ahead)."""
        return self.trainer_ranks[image_index % self.num_trainers]


class TrainerMPU:
    """The subset of Megatron's mpu interface that DeepSpeed asks for."""

    def __init__(self, trainer_group: Any, trainer_ranks: list[int], self_group: Any):
        self._dp = trainer_group
        self._dp_ranks = trainer_ranks
        self._mp = self_group

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: Optional[float] = None) -> bool:
    """Start torch.distributed from the launcher's environment, if there is one.

    Returns True when running distributed (world size > 1 or launched by a launcher).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    import deepspeed

    kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    # Every rank must start DeepSpeed's comms, or trainers spin inside initialize().
    deepspeed.init_distributed(dist_backend=default_backend(), **kw)
    return True


@dataclass(frozen=True)
class LocalLayout:
    """Where this rank sits on its node, as the launcher says."""
    local_rank: int
    local_size: int  # ranks on this node
    nodes: Optional[int]  # nodes in the job (None: the launcher does not say)


def _int_env(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise UserInputError(f"the launcher's {name}={env[name]!r} is not a number") from None
    return None


def local_layout(env: Mapping[str, str], world: int) -> LocalLayout:
    """This rank's node layout from the launcher's environment: torchrun sets LOCAL_RANK,
    LOCAL_WORLD_SIZE and GROUP_WORLD_SIZE (nodes); DeepSpeed's launcher sets LOCAL_RANK,
    LOCAL_SIZE and CROSS_SIZE (nodes). Neither: one node holding the whole world."""
    size = _int_env(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    return LocalLayout(local_rank=_int_env(env, "LOCAL_RANK") or 0, local_size=size if size else world,
                       nodes=_int_env(env, "GROUP_WORLD_SIZE", "CROSS_SIZE"))


def producer_ranks_for(world: int, num_producers: int, per_node: int, layout: LocalLayout,
                       rank: int = 0) -> list[int]:
    """The producer ranks: the last `num_producers` of the world (per_node=0), or the last
    `per_node` local ranks of every node (online.producers_per_node), ranks counted node by
    node as both launchers number them."""
    if per_node == 0:
        return list(range(world - num_producers, world))
    size = layout.local_size
    if per_node < 0 or per_node >= size:
        raise UserInputError(f"online.producers_per_node={per_node} must be between 0 and {size - 1}: each node "
                             f"runs {size} ranks and keeps at least one trainer")
    nodes = world // size
    if world % size or (layout.nodes is not None and layout.nodes != nodes):
        raise UserInputError(f"online.producers_per_node needs the same number of ranks on every node ({world} "
                             f"ranks, {size} on this node, {layout.nodes or '?'} nodes); set "
                             f"online.producers_per_node=0 (producers on the last online.producers ranks)")
    if layout.local_rank != rank % size:
        raise UserInputError(f"rank {rank} is local rank {layout.local_rank} of {size}: the launcher does not number "
                             f"ranks node by node; set online.producers_per_node=0")
    if num_producers != per_node * nodes:
        raise UserInputError(f"online.producers counts every producer of the job: online.producers_per_node="
                             f"{per_node} on {nodes} node(s) is online.producers={per_node * nodes} (got "
                             f"{num_producers})")
    return [n * size + size - per_node + j for n in range(nodes) for j in range(per_node)]


def check_devices(mode: str, local_ranks: int, gpus: int) -> None:
    """NCCL refuses two ranks on one device ("Duplicate GPU detected"): say what to do instead."""
    if gpus > 0 and local_ranks > gpus:
        hint = ("with one GPU, launch one rank and set online.mode=colocated (online.producers=0): "
                "the trainer then generates on its own device between steps" if gpus == 1 else
                f"launch at most {gpus} ranks per machine (deepspeed --num_gpus {gpus}), or use "
                f"online.mode=colocated")
        raise UserInputError(f"{local_ranks} ranks on this machine but only {gpus} GPU(s): NCCL cannot put two "
                             f"ranks on one GPU (online.mode={mode}); {hint}")


def setup_roles(num_producers: int, timeout_s: Optional[float] = None, mode: str = "launched",
                producers_per_node: int = 0) -> Roles:
    """Split the world into trainers (first ranks) and `num_producers` producers (last ranks,
    or the last `producers_per_node` local ranks of each node: producer_ranks_for).

    Must be called on every rank: `dist.new_group` is collective.
    """
    from .groups import create_groups, trainer_device

    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if num_producers < 0 or (num_producers > 0 and num_producers >= world):
        raise UserInputError(
            f"online.producers={num_producers} leaves no trainer in a world of {world} rank(s); "
            f"launch more ranks (deepspeed --num_gpus N) or lower online.producers"
            + (", or use online.mode=colocated (the trainer generates itself)" if world == 1 else "")
        )
    layout = local_layout(os.environ, world)
    if torch.cuda.is_available():
        check_devices(mode, layout.local_size, torch.cuda.device_count())
    producers = producer_ranks_for(world, num_producers, producers_per_node, layout, rank)
    trainers = [r for r in range(world) if r not in producers]
    roles = Roles(rank=rank, world_size=world, num_producers=num_producers,
                  trainer_ranks=trainers, producer_ranks=producers)
    if not distributed:
        return roles
    device = trainer_device()
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    groups = create_groups(trainers, world, device, timeout)
    roles.groups = groups
    roles.trainer_group, roles.control_group = groups.trainer, groups.control
    roles.transport_group = groups.world_control
    # One single-rank group per rank for the model-parallel slot (created on every rank).
    kw = {"timeout": timeout} if timeout is not None else {}
    self_groups = [dist.new_group([r], backend=default_backend(), **kw) for r in range(world)]
    if roles.is_trainer:
        roles.mpu = TrainerMPU(roles.trainer_group, trainers, self_groups[rank])
    return roles
