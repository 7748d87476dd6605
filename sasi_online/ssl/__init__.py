"""Self-supervised learning: backbones, heads, losses (pure functions), methods.

    backbone, feat_dim = build_backbone("resnet18", small_stem=True)
    method = build_method(cfg.method, global_batch=256)
    out = method([real_view, sasi_view], step, total_steps); out["loss"].backward()
    optimizer step; method.on_step_end(step, total_steps)
"""
from __future__ import annotations

import difflib

from sasi_online.config import MethodConfig
from sasi_online.errors import UserInputError
from sasi_online.ssl.backbones import build_backbone
from sasi_online.ssl.methods import METHODS, Method

__all__ = ["METHODS", "Method", "build_backbone", "build_method"]


def build_method(cfg: MethodConfig, global_batch: int | None = None) -> Method:
    """The method `cfg.name` on a fresh `cfg.backbone`. With `global_batch` (images per step
    over all trainers) start-up checks run now rather than at the first step."""
    if cfg.name not in METHODS:
        close = difflib.get_close_matches(str(cfg.name), list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserInputError(f"unknown method.name '{cfg.name}'.{hint} Choose one of: {', '.join(METHODS)}")
    from sasi_online.ssl.recipes import resolved_method_config

    cfg = resolved_method_config(cfg)  # fields left None: the method's published recipe
    cls = METHODS[cfg.name]
    if global_batch is not None:
        cls.validate_global_batch(cfg, global_batch)
    backbone, feat_dim = build_backbone(cfg.backbone, cfg.small_stem)
    method = cls(cfg, backbone, feat_dim)
    if global_batch is not None:
        method.check_global_batch(global_batch)
    return method
