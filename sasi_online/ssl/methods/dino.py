"""DINO (Caron et al. 2021): self-distillation with a momentum teacher that sees the global
views, a centred and sharpened teacher output, and multi-crop students.

extra (facebookresearch/dino main_dino.py defaults): teacher_temp (0.04), reached linearly
from warmup_teacher_temp (0.04) over the first teacher_temp_warmup_epochs (0),
center_momentum (0.9), freeze_last_layer_epochs (1: the last layer gets no gradient in the
first epoch). method.temperature is the student's (0.1); method.num_prototypes the output
size (65536); method.proj_hidden / proj_dim the head's hidden and bottleneck sizes
(2048, 256). DINO's weight-decay schedule, per-layer gradient clip and warm-up are optimizer
settings (optim.weight_decay_end, optim.clip_grad, optim.warmup_epochs).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import DINOHead
from sasi_online.ssl.losses import dino_loss
from sasi_online.ssl.methods.base import Method, make_target, run_target

Tensor = torch.Tensor


class DINO(Method):
    name = "dino"
    multi_crop = True
    default_temperature = 0.1
    default_momentum = 0.996
    uses_momentum = uses_temperature = True
    fp32_buffers = ("center",)
    extra_defaults = {"teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "teacher_temp_warmup_epochs": 0,
                      "center_momentum": 0.9, "freeze_last_layer_epochs": 1}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.head = DINOHead(feat_dim, cfg.num_prototypes, hidden_dim=cfg.proj_hidden,
                             bottleneck_dim=cfg.proj_dim)
        self.target_backbone = make_target(backbone)
        self.target_head = make_target(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.num_prototypes))
        self._pending: list[tuple[Tensor, int]] = []  # (sum of teacher outputs, rows)

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.head, self.target_head)]

    def teacher_temperature(self, step: int) -> float:
        e = self.extra
        warm = self.epochs_to_steps(e["teacher_temp_warmup_epochs"])
        if step >= warm:
            return float(e["teacher_temp"])
        return e["warmup_teacher_temp"] + (e["teacher_temp"] - e["warmup_teacher_temp"]) * step / warm

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        freeze = step < self.epochs_to_steps(self.extra["freeze_last_layer_epochs"])
        student = self._forward_grouped(lambda x: self.head(self.backbone(x), freeze_last=freeze), views)
        with torch.no_grad():
            teacher = self._forward_grouped(lambda x: run_target(self.target_head, run_target(self.target_backbone, x)),
                                            list(views[:self.num_global_views]))
        loss = dino_loss(student, teacher, self.center, self.temperature, self.teacher_temperature(step))
        if self.training:
            t = torch.cat(teacher)
            self._pending.append((t.sum(0, keepdim=True), t.shape[0]))
        return {"loss": loss, "teacher_entropy": self._entropy(teacher[0], step)}

    @torch.no_grad()
    def _entropy(self, t: Tensor, step: int) -> Tensor:
        # Entropy of the teacher's targets: collapse to one dimension drives it to 0,
        # collapse to uniform to log(K).
        p = torch.softmax((t - self.center) / self.teacher_temperature(step), dim=1)
        return -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        m = float(self.extra["center_momentum"])
        for total, rows in self._pending:
            total = D.all_reduce_sum(total.clone())
            mean = total / (rows * D.world_size())
            self.center.mul_(m).add_(mean.to(self.center.dtype), alpha=1 - m)
        self._pending.clear()
