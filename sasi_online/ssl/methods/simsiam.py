"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives, no momentum.
extra: fix_pred_lr (keep the predictor's learning rate fixed, as SimSiam recommends)."""
from __future__ import annotations

import torch.nn as nn

from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import negative_cosine
from sasi_online.ssl.methods.base import Method


class SimSiam(Method):
    name = "simsiam"
    extra_defaults = {"fix_pred_lr": True}  # simsiam main_simsiam.py L90, README.md L32

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        h, d = cfg.proj_hidden, cfg.proj_dim
        self.projector = mlp([feat_dim, h, h, d], last_norm="bn_noaffine")
        self.predictor = mlp([d, cfg.pred_hidden, d])

    def _special_groups(self):
        if not self.extra["fix_pred_lr"]:
            return []
        return [{"name": "predictor", "params": [p for p in self.predictor.parameters()],
                 "fixed_lr": True, "lars_exclude": False}]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        return {"loss": loss, "z_std": self._std_metric(z1)}
