"""Barlow Twins (Zbontar et al. 2021): drive the cross-correlation of the two views'
embeddings over the global batch to the identity. extra: lambd (off-diagonal weight),
scale_loss (a factor on the loss; solo-learn's presets use 0.1), bias_lr_ratio (biases and
norms train at this fraction of the weights' rate: 0.0048 / 0.2 in Barlow Twins' main.py)."""
from __future__ import annotations

import torch.nn as nn

from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import barlow_twins_loss
from sasi_online.ssl.methods.base import Method


class BarlowTwins(Method):
    name = "barlow_twins"
    extra_defaults = {"lambd": 0.0051, "scale_loss": 1.0, "bias_lr_ratio": 0.024}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        h = cfg.proj_hidden
        self.projector = mlp([feat_dim, h, h, cfg.proj_dim])

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        loss = barlow_twins_loss(D.gather_with_grad(z1), D.gather_with_grad(z2), self.extra["lambd"])
        loss = loss * float(self.extra["scale_loss"])
        return {"loss": loss, "z_std": self._std_metric(z1)}

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        for g in groups:
            if g.get("kind") == "no_decay":
                g["lr_scale"] = float(self.extra["bias_lr_ratio"])
        return groups
