"""SwAV (Caron et al. 2020): online clustering; each global view's Sinkhorn codes are
predicted from every other view (multi-crop: 2 global views, then local views).

extra: sinkhorn_epsilon (0.05), sinkhorn_iterations (3), queue_length (0 = no queue;
per-trainer embeddings kept for Sinkhorn when batches are small), queue_start_step
(step from which the queue is used), freeze_prototypes_steps (prototypes receive no
gradient before this step, as SwAV does for its first iterations).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.errors import UserInputError
from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import Prototypes, mlp
from sasi_online.ssl.losses import sinkhorn_knopp, swav_loss
from sasi_online.ssl.methods.base import Method

Tensor = torch.Tensor


class SwAV(Method):
    name = "swav"
    multi_crop = True
    default_temperature = 0.1
    extra_defaults = {"sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3, "queue_length": 0,
                      "queue_start_step": 0, "freeze_prototypes_steps": 0}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.projector = mlp([feat_dim, cfg.proj_hidden, cfg.proj_dim])
        self.prototypes = Prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.prototypes.normalize()
        length = int(self.extra["queue_length"])
        if length < 0:
            raise UserInputError(f"method.extra.queue_length must be >= 0 (0 = no queue), got {length}")
        # One queue per assigned (global) view; `queue_count` = rows filled so far.
        self.register_buffer("queue", torch.zeros(self.num_global_views, length, cfg.proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self._pending: list[list[Tensor]] = []

    def _embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def _codes(self, scores: Tensor, view: int, use_queue: bool) -> Tensor:
        out = scores.detach()
        filled = min(int(self.queue_count), self.queue.shape[1])
        if use_queue and filled:
            out = torch.cat([self.queue[view, :filled] @ self.prototypes.layer.weight.t(), out])
        codes = sinkhorn_knopp(out, self.extra["sinkhorn_epsilon"], int(self.extra["sinkhorn_iterations"]),
                               world_size=D.world_size(), all_reduce=D.all_reduce_sum)
        return codes[-scores.shape[0]:]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z = self._forward_grouped(self._embed, views)
        frozen = step < int(self.extra["freeze_prototypes_steps"])
        scores = [self.prototypes(zv, frozen=frozen) for zv in z]
        use_queue = self.queue.shape[1] > 0 and step >= int(self.extra["queue_start_step"])
        codes = [self._codes(scores[v], v, use_queue) for v in range(self.num_global_views)]
        loss = swav_loss(scores, codes, self.temperature)
        if self.training and self.queue.shape[1] > 0:
            self._pending.append([zv.detach() for zv in z[:self.num_global_views]])
        return {"loss": loss, "z_std": self._std_metric(z[0])}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        self.prototypes.normalize()
        for embeddings in self._pending:
            for v, zv in enumerate(embeddings):
                # Newest first; the oldest rows fall off the end (SwAV's queue).
                length, zv = self.queue.shape[1], zv.to(self.queue.dtype)
                if zv.shape[0] >= length:
                    self.queue[v] = zv[:length]
                else:
                    self.queue[v] = torch.cat([zv, self.queue[v, :length - zv.shape[0]]])
            self.queue_count += embeddings[0].shape[0]
        self._pending.clear()
