"""MoCo-v3 (Chen, Xie & He 2021): momentum encoder, predictor, and the other view's keys
of the whole (gathered) batch as negatives; no queue. Suited to ViT-S and ResNets."""
from __future__ import annotations

import torch
import torch.nn as nn

from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import cross_batch_info_nce
from sasi_online.ssl.methods.base import Method, make_target, run_target


class MoCoV3(Method):
    name = "mocov3"
    default_temperature = 0.2
    default_momentum = 0.99
    uses_momentum = uses_temperature = True
    temperature_doc = "1.0 (ResNet), 0.2 (ViT)"  # moco-v3 main_moco.py L104, CONFIG.md L113

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        h, d = cfg.proj_hidden, cfg.proj_dim
        # MoCo-v3's published heads differ by backbone: ViTs get a 3-layer projector and a
        # predictor ending in BatchNorm; ResNets a 2-layer projector and a predictor without
        # the last BatchNorm (moco-v3 main_moco.py: MoCo_ViT / MoCo_ResNet).
        vit = str(cfg.backbone).startswith("vit")
        if cfg.temperature is None and not vit:
            self.temperature = 1.0  # the published ResNet default (--moco-t 1.0); ViTs use 0.2
        self.projector = mlp([feat_dim, h, h, d] if vit else [feat_dim, h, d], last_norm="bn_noaffine")
        self.predictor = mlp([d, cfg.pred_hidden, d], last_norm="bn_noaffine" if vit else "none")
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        q1, q2 = (self.predictor(self.projector(self.backbone(v))) for v in views)
        with torch.no_grad():
            k1, k2 = (run_target(self.target_projector, run_target(self.target_backbone, v)) for v in views)
        offset = D.rank() * views[0].shape[0]
        loss = (cross_batch_info_nce(q1, D.gather(k2), self.temperature, offset)
                + cross_batch_info_nce(q2, D.gather(k1), self.temperature, offset))
        return {"loss": loss, "q_std": self._std_metric(q1)}
