"""BYOL (Grill et al. 2020): online network with predictor regresses the EMA target's
projection of the other view; symmetric, SUMMED over the two directions as BYOL's
L + L~ (Grill et al. 2020, Sec. 3.1 eq. 2)."""
from __future__ import annotations

import torch
import torch.nn as nn

from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import byol_loss
from sasi_online.ssl.methods.base import Method, make_target, run_target


class BYOL(Method):
    name = "byol"
    default_momentum = 0.996
    uses_momentum = True

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        d = cfg.proj_dim
        self.projector = mlp([feat_dim, cfg.proj_hidden, d])
        self.predictor = mlp([d, cfg.pred_hidden, d])
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = (run_target(self.target_projector, run_target(self.target_backbone, v)) for v in views)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "z_std": self._std_metric(z1)}
