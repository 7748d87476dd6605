"""MoCo-v2 (Chen et al. 2020): a momentum key encoder and a queue of negatives.

views[0] (the real image) gives the queries, views[1] (its SASI) the keys, as in the
SASI paper's Fig. 2. Shuffle-BN is on by default (method.shuffle_bn; MoCo's
builder.py). extra: symmetric (also swap the roles; twice the cost), bn_splits
(shuffle-BN in one process: key sub-batches that each see their own BatchNorm
statistics, emulating trainers on separate devices).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.errors import UserInputError
from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import info_nce
from sasi_online.ssl.methods.base import Method, make_target, run_target, shuffled_keys

Tensor = torch.Tensor


class MoCoV2(Method):
    name = "mocov2"
    default_temperature = 0.2
    default_momentum = 0.999
    default_momentum_final = None  # MoCo-v2 keeps its key-encoder momentum fixed
    uses_momentum = uses_temperature = True
    fp32_buffers = ("queue",)
    extra_defaults = {"symmetric": False, "bn_splits": 2}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        # MoCo-v2's head: Linear-ReLU-Linear, no BatchNorm.
        self.projector = mlp([feat_dim, cfg.proj_hidden, cfg.proj_dim], batch_norm=False)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        if cfg.queue_size < 1:
            raise UserInputError(f"method.queue_size must be >= 1 (a multiple of the global batch, "
                                 f"e.g. 65536), got {cfg.queue_size}")
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[Tensor] = []
        self._checked_batch: int | None = None

    @classmethod
    def validate_global_batch(cls, cfg, global_batch: int) -> None:
        queue = cfg.queue_size
        if queue < 1:  # 0 or a negative multiple would pass the divisibility test below
            raise UserInputError(f"method.queue_size must be >= 1 (a multiple of the global batch "
                                 f"{global_batch}), got {queue}")
        if global_batch < 1 or queue % global_batch:
            lower = (queue // global_batch) * global_batch if global_batch >= 1 else 0
            raise UserInputError(
                f"method.queue_size={queue} is not a multiple of the global batch {global_batch} "
                f"(per-trainer batch x trainers): each step replaces one global batch of keys, so "
                f"set method.queue_size to a multiple of {global_batch} (e.g. {max(lower, global_batch)}) "
                f"or change train.batch_size")

    def check_global_batch(self, global_batch: int) -> None:
        self.validate_global_batch(self.cfg, global_batch)
        self._checked_batch = global_batch

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def _key_net(self, x: Tensor) -> Tensor:
        return F.normalize(run_target(self.target_projector, run_target(self.target_backbone, x)), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Key embeddings, with shuffle-BN when method.shuffle_bn is set."""
        if not self.cfg.shuffle_bn:
            return self._key_net(x)
        return shuffled_keys(self._key_net, x, self.cfg.proj_dim, self.extra["bn_splits"])

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        global_batch = views[0].shape[0] * D.world_size()
        if self._checked_batch != global_batch:
            self.check_global_batch(global_batch)
        pairs = [(0, 1), (1, 0)] if self.extra["symmetric"] else [(0, 1)]
        queue = self.queue.clone().detach()  # fp32 (losses widen q and k to it)
        losses, accs = [], []
        for qi, ki in pairs:
            q = self._query(views[qi])
            k = self.keys(views[ki])
            losses.append(info_nce(q, k, queue, self.temperature))
            with torch.no_grad():
                # Positive ranked above every negative: a cheap sign of learning.
                qf = q.float()
                accs.append(((qf * k.float()).sum(1) > (qf @ queue.t()).max(1).values).float().mean())
            if self.training:
                self._pending_keys.append(D.gather(k))
        loss = sum(losses) / len(losses)
        return {"loss": loss, "acc": torch.stack(accs).mean(), "q_std": self._std_metric(q)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        for keys in self._pending_keys:
            self._enqueue(keys)
        self._pending_keys.clear()

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        n, size = keys.shape[0], self.queue.shape[0]
        ptr = self.host_count("queue_ptr")
        if size % n:
            raise ValueError(f"method.queue_size={size} is not a multiple of the {n} keys pushed "
                             f"per step; choose a multiple of the global batch")
        self.queue[ptr:ptr + n] = keys.to(self.queue.dtype)
        self.set_count("queue_ptr", (ptr + n) % size)
