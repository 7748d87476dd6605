"""SimCLR (Chen et al. 2020): NT-Xent over the global batch, gathered with gradients.
The projector is SimCLR-v2's 3 layers (tf2/run.py num_proj_layers=3, tf2/model.py
ProjectionHead: BatchNorm on every layer, the output one included)."""
from __future__ import annotations

import torch.nn as nn

from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import nt_xent
from sasi_online.ssl.methods.base import Method


class SimCLR(Method):
    name = "simclr"
    default_temperature = 0.1  # google-research/simclr tf2/run.py --temperature
    uses_temperature = True

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        h = cfg.proj_hidden
        self.projector = mlp([feat_dim, h, h, cfg.proj_dim], last_norm="bn")

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        offset = D.rank() * z1.shape[0]
        loss = nt_xent(z1, z2, self.temperature, D.gather_with_grad(z1), D.gather_with_grad(z2), offset)
        return {"loss": loss, "z_std": self._std_metric(z1)}
