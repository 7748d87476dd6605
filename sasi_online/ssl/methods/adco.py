"""AdCo (Hu et al. 2021): negatives are a learnable memory bank trained ADVERSARIALLY:
the encoder descends on the contrastive loss while the bank ascends on it.

One backward does both: the returned loss is the encoder's, plus the bank's own term
(with its sharper temperature) minus its detached value, with its sign flipped. The
value is unchanged; the bank's gradient is the NEGATIVE of its loss's gradient, so the
optimizer's descent step is an ascent step for the bank. The bank is its own parameter
group with its own learning rate (extra.mem_lr) and weight decay.

extra: mem_temperature (0.02), mem_lr (3.0), mem_weight_decay (1e-4), bank_size
(None = method.queue_size), symmetric (False).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.errors import UserInputError
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import adco_loss
from sasi_online.ssl.methods.base import Method, make_target


class AdCo(Method):
    name = "adco"
    default_temperature = 0.12
    default_momentum = 0.99
    default_momentum_final = None  # a fixed momentum, as MoCo-v2
    extra_defaults = {"mem_temperature": 0.02, "mem_lr": 3.0, "mem_weight_decay": 1e-4,
                      "bank_size": None, "symmetric": False}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.projector = mlp([feat_dim, cfg.proj_hidden, cfg.proj_dim], batch_norm=False)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        size = self.extra["bank_size"] or cfg.queue_size
        if int(size) < 1:
            raise UserInputError(f"method.extra.bank_size (or method.queue_size) must be >= 1, got {size}")
        self.memory_bank = nn.Parameter(F.normalize(torch.randn(int(size), cfg.proj_dim), dim=1))

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def _special_groups(self):
        return [{"name": "memory_bank", "params": [self.memory_bank], "lr": float(self.extra["mem_lr"]),
                 "weight_decay": float(self.extra["mem_weight_decay"]), "lars_exclude": True}]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        pairs = [(0, 1), (1, 0)] if self.extra["symmetric"] else [(0, 1)]
        enc_losses, bank_losses = [], []
        for qi, ki in pairs:
            q = F.normalize(self.projector(self.backbone(views[qi])), dim=1)
            with torch.no_grad():
                k = F.normalize(self.target_projector(self.target_backbone(views[ki])), dim=1)
            enc_losses.append(adco_loss(q, k, self.memory_bank.detach(), self.temperature))
            bank_losses.append(adco_loss(q.detach(), k, self.memory_bank, self.extra["mem_temperature"]))
        enc = sum(enc_losses) / len(enc_losses)
        bank = sum(bank_losses) / len(bank_losses)
        loss = enc - (bank - bank.detach())  # value: enc; bank gradient: -d(bank)/d(memory_bank)
        return {"loss": loss, "bank_loss": bank.detach(), "q_std": self._std_metric(q)}
