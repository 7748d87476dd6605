"""One untrained MoCo-v2 checkpoint of the kind `sasi eval` reads, shared by the eval tests."""
from __future__ import annotations

from pathlib import Path

import torch


def save_untrained_mocov2(path: Path):
    """A real (untrained) MoCo-v2 ResNet-18 on 16 px embedded images, saved at `path`.
    Returns (cfg, method)."""
    from sasi_online import ssl
    from sasi_online.config import Config

    cfg = Config()
    cfg.data.limit, cfg.data.image_size = 120, 16
    cfg.method.name, cfg.method.queue_size = "mocov2", 256
    torch.manual_seed(0)
    method = ssl.build_method(cfg.method)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": method.state_dict()}, path)
    return cfg, method
