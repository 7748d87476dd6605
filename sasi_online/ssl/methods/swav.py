"""SwAV (Caron et al. 2020): online clustering; each global view's Sinkhorn codes are
predicted from every other view (multi-crop: 2 global views, then local views).

extra (facebookresearch/swav scripts/swav_200ep_bs256_pretrain.sh): sinkhorn_epsilon (0.05),
sinkhorn_iterations (3), queue_length (3840 over all trainers, each holding its share;
0 = no queue; rounded down to a multiple of the global batch as SwAV does), queue_start_epochs
(15: as in main_swav.py L225-L300, the queue starts filling at this epoch and joins the codes'
Sinkhorn once it is full),
freeze_prototypes_epochs (1: prototypes receive no gradient in the first epoch; SwAV's 5005
iterations at batch 256).
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
    uses_temperature = True
    fp32_buffers = ("queue",)
    extra_defaults = {"sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3, "queue_length": 3840,
                      "queue_start_epochs": 15, "freeze_prototypes_epochs": 1}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.projector = mlp([feat_dim, cfg.proj_hidden, cfg.proj_dim])
        self.prototypes = Prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.prototypes.normalize()
        length = int(self.extra["queue_length"])
        if length < 0:
            raise UserInputError(f"method.extra.queue_length must be >= 0 (0 = no queue), got {length}")
        # One queue per assigned (global) view, this trainer's share; `queue_count` = rows filled.
        length //= D.world_size()
        self.register_buffer("queue", torch.zeros(self.num_global_views, length, cfg.proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self._pending: list[list[Tensor]] = []

    def check_global_batch(self, global_batch: int) -> None:
        """SwAV's rule: the queue holds whole batches (main_swav.py L213), rounded down."""
        per_trainer = global_batch // max(D.world_size(), 1)
        length = self.queue.shape[1]
        if per_trainer > 0 and length % per_trainer:
            self.queue = self.queue[:, :length - length % per_trainer].contiguous()

    def _embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def _codes(self, scores: Tensor, view: int, use_queue: bool) -> Tensor:
        out = scores.detach()
        filled = min(self.host_count("queue_count"), self.queue.shape[1])
        if use_queue and filled:
            w = self.prototypes.layer.weight.detach().float()
            w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as the forward uses them
            out = torch.cat([(self.queue[view, :filled] @ w.t()).to(out.dtype), out])
        codes = sinkhorn_knopp(out, self.extra["sinkhorn_epsilon"], int(self.extra["sinkhorn_iterations"]),
                               world_size=D.world_size(), all_reduce=D.all_reduce_sum)
        return codes[-scores.shape[0]:]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z = self._forward_grouped(self._embed, views)
        frozen = step < self.epochs_to_steps(self.extra["freeze_prototypes_epochs"])
        scores = [self.prototypes(zv, frozen=frozen) for zv in z]
        length = self.queue.shape[1]
        started = length > 0 and step >= self.epochs_to_steps(self.extra["queue_start_epochs"])
        use_queue = started and self.host_count("queue_count") >= length  # full
        codes = [self._codes(scores[v], v, use_queue) for v in range(self.num_global_views)]
        loss = swav_loss(scores, codes, self.temperature)
        if self.training and started:
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
            self.set_count("queue_count", self.host_count("queue_count") + embeddings[0].shape[0])
        self._pending.clear()
