"""VICReg (Bardes et al. 2022): invariance + variance + covariance terms over the global
batch. extra: sim_weight, var_weight, cov_weight (25, 25, 1 as published)."""
from __future__ import annotations

import torch.nn as nn

from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import vicreg_loss
from sasi_online.ssl.methods.base import Method


class VICReg(Method):
    name = "vicreg"
    extra_defaults = {"sim_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        h = cfg.proj_hidden
        self.projector = mlp([feat_dim, h, h, cfg.proj_dim])

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        e = self.extra
        loss = vicreg_loss(D.gather_with_grad(z1), D.gather_with_grad(z2),
                           e["sim_weight"], e["var_weight"], e["cov_weight"])
        return {"loss": loss, "z_std": self._std_metric(z1)}
